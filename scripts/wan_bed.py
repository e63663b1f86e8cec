"""A WAN test bed: every host in its own network namespace, links with one-way delay, rate and loss.

    with WanBed(["boot", "p0", "p1", "p2", "client"], delay_ms=20, rate_mbit=100, loss=0.001) as bed:
        proc = bed.run("p0", ["python", "-m", "molink.peer.cli", ...])    # a Popen inside p0's namespace
        bed.addr("p0")                                                       # "10.77.0.2"
        bed.stats()["links"]["client>p0"]                                    # packets/bytes/lost on that link

    python scripts/wan_bed.py probe [--delay-ms 20 --rate-mbit 100 --loss 0.001]   # RTT + throughput, then clean up
    python scripts/wan_bed.py shell [...]     # build the bed, print how to enter it, wait for Ctrl-C
    python scripts/wan_bed.py cleanup         # remove leftovers of beds whose owner died (SIGKILL)

Needs root (without it: a message and exit status 2). Namespaces are named `mlwan-<pid>-<host>`,
addresses are 10.77.0.N/24 on a device `wan0` in each namespace; no namespace has a default route,
so nothing leaves the bed.

Backends:
  - `tun` (used when the kernel has no netem, like ours): a forwarder process (wan_forward.py) owns a TUN
    device in every namespace and moves each IPv4 packet to the TUN of its destination after the link's
    loss (Bernoulli), serialisation at the link's rate (a FIFO with a 1000-packet tail-drop
    buffer, like netem's default limit) and its one-way delay. One epoll loop, one heap ordered by
    release time, one timerfd armed at the next release: microsecond timing, no threads, and idle
    CPU when idle. Links are per ordered host pair and can be overridden one by one; the forwarder
    counts packets and bytes per link (the benchmark's bytes-on-the-wire come from there).
  - `netem` (chosen by `auto` where `tc ... netem` works): veths to a bridge in a hub namespace,
    netem on each host's egress (delay, rate, loss): no forwarder CPU at all. Per-host settings
    only; counters per host (tx/rx of its wan0).
Cleanup (close(), atexit, and the CLI's SIGTERM/SIGINT handling): our Popens by pid (TERM, then
KILL), then any pid still inside our namespaces, then the forwarder (its TUNs vanish with it), then
the namespaces. If the owner is SIGKILLed, the forwarder sees its control pipe close and does the
same janitor work.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time

PREFIX = "mlwan-"
SUBNET = "10.77.0."
DEV = "wan0"
STOP_TIMEOUT = 10.0
QUEUE_PACKETS = 1000  # netem's default limit; a 1500-byte MTU makes it 1.5 MB of buffer


def need_root() -> None:
    if os.geteuid() != 0:
        print("wan_bed: needs root (network namespaces, TUN devices); run it as root", file=sys.stderr)
        sys.exit(2)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netem_available() -> bool:
    """Whether this kernel has netem: try it on the loopback of a throwaway namespace."""
    ns = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", ns)
        probe = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                               capture_output=True)
        return probe.returncode == 0
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        _ip("netns", "delete", ns, check=False)


class WanBed:
    def __init__(self, hosts: list[str], delay_ms: float = 20.0, rate_mbit: float | None = 100.0,
                 loss: float = 0.0, links: dict[tuple[str, str], dict] | None = None, backend: str = "auto",
                 sysctls: dict[str, str] | None = None, route_options: list[str] | None = None):
        """links: per ordered pair overrides, e.g. {("p0", "p1"): {"delay_ms": 50}} (tun backend);
        sysctls: set in every host namespace, e.g. {"net.ipv4.tcp_slow_start_after_idle": "0"};
        route_options: added to every host's route to the bed, e.g. ["initcwnd", "64", "initrwnd", "64"]."""
        if len(set(hosts)) != len(hosts) or not 0 < len(hosts) < 250:
            raise ValueError("hosts must be 1..249 distinct names")
        self.hosts = list(hosts)
        self.default = {"delay_ms": delay_ms, "rate_mbit": rate_mbit, "loss": loss}
        self.links = {f"{a}>{b}": {**self.default, **o} for (a, b), o in (links or {}).items()}
        self.backend = backend
        self.sysctls = dict(sysctls or {})
        self.route_options = list(route_options or [])
        self.tag = f"{PREFIX}{os.getpid()}-"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self.forwarder: subprocess.Popen | None = None
        self._closed = True

    # ------------------------------------------------------------------ life cycle
    def ns(self, host: str) -> str:
        return self.tag + host

    def addr(self, host: str) -> str:
        return SUBNET + str(self.hosts.index(host) + 1)

    def __enter__(self) -> "WanBed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "WanBed":
        need_root()
        if self.backend == "auto":
            self.backend = "netem" if netem_available() else "tun"
        if self.backend == "netem" and self.links:
            raise ValueError("per-link overrides need the tun backend (netem shapes each host's egress)")
        self._closed = False
        atexit.register(self.close)
        try:
            for host in self.hosts:
                ns = self.ns(host)
                _ip("netns", "add", ns)
                self.namespaces.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # no IPv6: no router solicitations or MLD reports on the links, only our traffic
                settings = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1",
                            **self.sysctls}
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", *(f"{k}={v}" for k, v in settings.items())],
                               check=True, capture_output=True)
            (self._start_tun if self.backend == "tun" else self._start_netem)()
            for host in self.hosts:
                _ip("-n", self.ns(host), "addr", "add", f"{self.addr(host)}/24", "dev", DEV)
                _ip("-n", self.ns(host), "link", "set", DEV, "up", "mtu", "1500", "txqueuelen", "1000")
                if self.route_options:
                    _ip("-n", self.ns(host), "route", "replace", SUBNET + "0/24", "dev", DEV, "src", self.addr(host),
                        *self.route_options)
        except BaseException:
            self.close()
            raise
        return self

    def _start_tun(self) -> None:
        spec = {"namespaces": self.namespaces, "addrs": [self.addr(h) for h in self.hosts], "hosts": self.hosts,
                "default": self.default, "links": self.links}
        # own session: a Ctrl-C at the terminal must not cut the network while peers say goodbye
        forwarder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wan_forward.py")
        self.forwarder = subprocess.Popen([sys.executable, forwarder, json.dumps(spec)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          start_new_session=True)
        line = self.forwarder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"wan_bed forwarder failed to start (exit {self.forwarder.poll()}): {line!r}")

    def _start_netem(self) -> None:
        hub = self.tag + "hub"
        _ip("netns", "add", hub)
        self.namespaces.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            _ip("-n", hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", DEV, "netns", self.ns(host))
            _ip("-n", hub, "link", "set", f"h{i}", "master", "br0", "up")
            d = self.default
            rate = ["rate", f"{d['rate_mbit']}mbit"] if d["rate_mbit"] else []
            subprocess.run(["tc", "-n", self.ns(host), "qdisc", "add", "dev", DEV, "root", "netem", "limit",
                            str(QUEUE_PACKETS), "delay", f"{d['delay_ms']}ms", *rate, "loss",
                            f"{100 * d['loss']}%"], check=True, capture_output=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _janitor(self.namespaces)
        if self.forwarder is not None:
            try:
                self.forwarder.stdin.close()  # EOF: the forwarder exits, its TUN devices go with it
                self.forwarder.wait(STOP_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                self.forwarder.kill()
                self.forwarder.wait()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    # ------------------------------------------------------------------ use
    def run(self, host: str, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start argv inside host's namespace (`ip netns exec` execs it: the pid is argv's own)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], **popen_kwargs)
        self.processes.append(proc)
        return proc

    def check_output(self, host: str, argv: list[str], timeout: float = 60.0) -> str:
        proc = self.run(host, argv, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv, out)
        return out

    def stats(self, hosts: bool = True) -> dict:
        """{"links": {"a>b": {"packets", "bytes", "lost", "queue_drops"}}, "hosts": {h: tx/rx of its wan0}}.

        netem has no per-pair counters: there "links" holds each host's egress as "host>*"."""
        result = {}
        if hosts or self.forwarder is None:
            result["hosts"] = {}
            for host in self.hosts:
                info = json.loads(_ip("-j", "-s", "-n", self.ns(host), "link", "show", DEV).stdout)[0]["stats64"]
                result["hosts"][host] = {"tx_bytes": info["tx"]["bytes"], "rx_bytes": info["rx"]["bytes"],
                                         "tx_packets": info["tx"]["packets"], "rx_packets": info["rx"]["packets"]}
        if self.forwarder is not None:
            self.forwarder.stdin.write("stats\n")
            self.forwarder.stdin.flush()
            result["links"] = json.loads(self.forwarder.stdout.readline())
        else:
            result["links"] = {f"{h}>*": {"packets": v["tx_packets"], "bytes": v["tx_bytes"], "lost": None,
                                          "queue_drops": None} for h, v in result["hosts"].items()}
        return result

    def measure_rtt(self, a: str, b: str, count: int = 20, size: int = 64) -> list[float]:
        """UDP echo round trips from a to b in ms (no ping on this machine): b echoes, a times."""
        server = self.run(b, [sys.executable, os.path.abspath(__file__), "_echo", self.addr(b)],
                          stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()  # "listening"
            out = self.check_output(a, [sys.executable, os.path.abspath(__file__), "_ping", self.addr(b),
                                        str(count), str(size)])
        finally:
            server.kill()
            server.wait()
        return json.loads(out)


def _janitor(namespaces: list[str]) -> None:
    """Kill whatever still runs inside our namespaces (by pid), then delete them."""
    for ns in namespaces:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for ns in namespaces:
        for _ in range(50):  # a namespace with a dying process in it may take a moment
            if _ip("netns", "delete", ns, check=False).returncode == 0 or ns not in _ip("netns", "list").stdout:
                break
            time.sleep(0.1)


def leftovers() -> list[str]:
    """Namespaces of beds whose owner is gone (SIGKILLed before its forwarder could clean up)."""
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.startswith(PREFIX)]
    return [n for n in names if not os.path.exists(f"/proc/{n[len(PREFIX):].split('-')[0]}")]


# ---------------------------------------------------------------------- helpers run inside namespaces
def _echo(addr: str) -> None:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 7777))
    print("listening", flush=True)
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


def _ping(addr: str, count: str, size: str) -> None:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    rtts = []
    for i in range(int(count)):
        payload = i.to_bytes(4, "big").ljust(int(size), b"x")
        started = time.perf_counter()
        sock.sendto(payload, (addr, 7777))
        try:
            while sock.recv(65536)[:4] != payload[:4]:
                pass
            rtts.append(1000 * (time.perf_counter() - started))
        except TimeoutError:
            pass  # lost (the bed's loss applies to UDP too)
        time.sleep(0.02)
    print(json.dumps(rtts))


def _throughput(bed: WanBed, a: str, b: str, seconds: float = 3.0) -> float:
    """Mbit/s of one TCP stream a -> b (python sockets on both ends)."""
    sink = ("import socket,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            f"s.bind(('{bed.addr(b)}',7778));s.listen();print('up',flush=True);c,_=s.accept();n=0;t=None\n"
            "while True:\n d=c.recv(1<<20)\n if not d: break\n t=t or time.perf_counter();n+=len(d)\n"
            "print(n*8/(time.perf_counter()-t)/1e6)")
    server = bed.run(b, [sys.executable, "-c", sink], stdout=subprocess.PIPE, text=True)
    server.stdout.readline()
    source = (f"import socket,time;s=socket.create_connection(('{bed.addr(b)}',7778));"
              f"b=bytes(1<<16);e=time.perf_counter()+{seconds}\nwhile time.perf_counter()<e: s.sendall(b)\ns.close()")
    bed.check_output(a, [sys.executable, "-c", source], timeout=seconds + 30)
    out, _ = server.communicate(timeout=30)
    return float(out.strip())


def main() -> None:
    import argparse

    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # internal entry points
        {"_echo": lambda: _echo(sys.argv[2]), "_ping": lambda: _ping(*sys.argv[2:5])}[sys.argv[1]]()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["probe", "shell", "cleanup"])
    parser.add_argument("--hosts", default="a,b")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--loss", type=float, default=0.001)
    parser.add_argument("--backend", choices=["auto", "tun", "netem"], default="auto")
    args = parser.parse_args()
    need_root()
    if args.command == "cleanup":
        stale = leftovers()
        _janitor(stale)
        print(f"removed {len(stale)} stale namespaces: {' '.join(stale)}")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the with-block
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    hosts = args.hosts.split(",")
    try:
        with WanBed(hosts, args.delay_ms, args.rate_mbit, args.loss, backend=args.backend) as bed:
            print(f"backend {bed.backend}; " + ", ".join(f"{h} {bed.addr(h)} (netns {bed.ns(h)})" for h in hosts))
            if args.command == "probe":
                rtts = sorted(bed.measure_rtt(hosts[0], hosts[1], count=50))
                print(f"RTT {hosts[0]}->{hosts[1]}: {len(rtts)}/50 answered, min {rtts[0]:.2f} median "
                      f"{rtts[len(rtts) // 2]:.2f} max {rtts[-1]:.2f} ms (2 x delay = {2 * args.delay_ms:.1f})")
                print(f"TCP {hosts[0]}->{hosts[1]}: {_throughput(bed, hosts[0], hosts[1]):.1f} Mbit/s "
                      f"(rate {args.rate_mbit})")
                print(json.dumps(bed.stats().get("links", {})))
            else:
                print(f"enter a host: ip netns exec {bed.ns(hosts[0])} bash   (Ctrl-C here removes the bed)")
                signal.pause()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
