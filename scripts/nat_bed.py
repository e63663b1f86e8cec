"""A NAT test bed: public hosts on a shared "internet", and home networks each behind its own router.

    with NatBed(public=["boot", "relay2"], homes=["p0", "p1", "client"], nat="cone") as bed:
        bed.run("p0", [...])           # a Popen inside p0's namespace (home network behind its NAT)
        bed.addr("p0")                 # "192.168.1.2": the address p0 itself has
        bed.public_ip("p0")            # "10.78.0.101": what the internet sees (its router's WAN side)

    python scripts/nat_bed.py probe [--nat cone|symmetric|none] [--delay-ms 20 --rate-mbit 100 --loss 0.001]
                                  # reachability + a TCP punch (+ the RTT when shaped), then clean up
    python scripts/nat_bed.py shell [--nat ...]                   # build it, print how to enter it, wait for Ctrl-C
    python scripts/nat_bed.py cleanup                             # remove leftovers of beds whose owner died

Layout (root only; namespaces `mlnat-<pid>-<name>`, nothing leaves the bed, no default route out):
  internet: 10.78.0.0/24. Unshaped (the default): a bridge in a hub namespace (bridge netfilter
            off, as DESIGN.md §6 says), members plugged in by veth. Shaped (delay_ms / rate_mbit /
            loss, --delay-ms ...): no hub; wan_bed.py's forwarder (wan_forward.py) owns a TUN `wan0`
            in every member and gives each packet between two members the link's loss, rate and
            one-way delay, once per crossing (home -> public, public -> home and home -> home alike)
  public:   one namespace per public host, 10.78.0.(10+i), a member of the internet
  homes:    per home host H two namespaces: H-rt, its router (WAN `wan0` 10.78.0.(101+j), a member of
            the internet; LAN 192.168.(j+1).1) and H itself (192.168.(j+1).2 on a plain veth to its
            router, no shaping: the LAN; default route via its router)
NAT kinds (per home, `nat=` for all or a dict per home):
  cone:      nftables masquerade (keeps the source port: a port-restricted cone) + a stateful filter
             dropping unsolicited inbound on the WAN side, forwarded or to the router itself
             (dropped, not refused: a home router sends no RST)
  symmetric: the same with `masquerade fully-random` (a new random port per mapping)
  none:      the router only routes; every public host gets a route to the home networks
Reuses wan_bed.py's namespace life cycle (process tracking, janitor, atexit and SIGKILL-safe names;
a shaped bed's forwarder removes every namespace of the bed when its owner dies).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from wan_bed import DEV as WAN_DEV, WanBed, _ip, _janitor  # noqa: E402

PREFIX = "mlnat-"
PUBLIC_NET = "10.78.0."
NAT_KINDS = ("cone", "symmetric", "none")


def need_root() -> None:
    if os.geteuid() != 0:
        print("nat_bed: needs root (network namespaces, nftables); run it as root", file=sys.stderr)
        sys.exit(2)


def missing_tools() -> list[str]:
    from shutil import which

    return [tool for tool in ("ip", "nft") if which(tool) is None]


def _exec(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True)


def _nft_rules(kind: str) -> str:
    masquerade = {"cone": "masquerade", "symmetric": "masquerade fully-random"}[kind]
    # input + forward: like a home router, nothing unsolicited gets in, and nothing is refused
    return f"""
table ip molink_nat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "wan0" {masquerade}; }}
  chain forward {{ type filter hook forward priority filter; policy accept;
    iifname "wan0" ct state established,related accept; iifname "wan0" drop; }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname "wan0" ct state established,related accept; iifname "wan0" drop; }}
}}
"""


class NatBed(WanBed):
    def __init__(self, public: list[str], homes: list[str], nat: str | dict[str, str] = "cone",
                 delay_ms: float | None = None, rate_mbit: float | None = None, loss: float = 0.0):
        """delay_ms, rate_mbit, loss: shape the internet (per direction of each pair of internet
        members); all left out = the bridge, no shaping."""
        names = list(public) + list(homes)
        if len(set(names)) != len(names) or not names or len(homes) > 150 or len(public) > 80:
            raise ValueError("host names must be distinct (≤ 80 public, ≤ 150 homes)")
        kinds = nat if isinstance(nat, dict) else {home: nat for home in homes}
        if set(kinds) != set(homes) or not set(kinds.values()) <= set(NAT_KINDS):
            raise ValueError(f"nat must be one of {NAT_KINDS}, or a dict giving one per home")
        if "none" in kinds.values() and set(kinds.values()) != {"none"}:
            raise ValueError("routed homes (nat='none') cannot be mixed with NATed ones in one bed")
        # WanBed's life cycle (namespaces, processes, close) with our own topology
        self.hosts, self.public, self.homes, self.nat = names, list(public), list(homes), kinds
        self.shaped = bool(delay_ms or rate_mbit or loss)
        self.default = {"delay_ms": float(delay_ms or 0.0), "rate_mbit": rate_mbit, "loss": float(loss)}
        self.tag = f"{PREFIX}{os.getpid()}-"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self.forwarder = None
        self.backend = "tun" if self.shaped else "veth"
        self._closed = True

    # ------------------------------------------------------------------ addresses
    def addr(self, host: str) -> str:
        if host in self.public:
            return PUBLIC_NET + str(10 + self.public.index(host))
        return f"192.168.{self.homes.index(host) + 1}.2"

    def public_ip(self, host: str) -> str:
        """The address the internet sees for `host` (its router's WAN address for a home host)."""
        if host in self.public or self.nat[host] == "none":
            return self.addr(host)
        return self.wan_ip(host)

    def wan_ip(self, home: str) -> str:
        return PUBLIC_NET + str(101 + self.homes.index(home))

    def router(self, home: str) -> str:
        return self.ns(home) + "-rt"

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "NatBed":
        need_root()
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"nat_bed needs {missing} (scripts/setup_env.sh installs nftables when root)")
        import atexit

        self._closed = False
        atexit.register(self.close)
        try:
            if not self.shaped:
                hub = self._netns(self.tag + "hub")
                _ip("-n", hub, "link", "add", "br0", "type", "bridge")
                _ip("-n", hub, "link", "set", "br0", "up")
                subprocess.run(["ip", "netns", "exec", hub, "sysctl", "-qw",
                                "net.bridge.bridge-nf-call-iptables=0"],
                               capture_output=True)  # absent without br_netfilter: nothing to turn off then
            for ns in self._internet() + [self.ns(home) for home in self.homes]:
                self._netns(ns)
            if self.shaped:  # after every namespace exists: its cleanup list must name them all
                self._start_forwarder()
            for i, host in enumerate(self.public):
                self._attach(f"p{i}", self.ns(host), "eth0", f"{self.addr(host)}/24")
            for j, home in enumerate(self.homes):
                self._home(j, home)
        except BaseException:
            self.close()
            raise
        return self

    def _internet(self) -> list[str]:
        """The namespaces on the internet: the public hosts, then the homes' routers."""
        return [self.ns(host) for host in self.public] + [self.router(home) for home in self.homes]

    def _start_forwarder(self) -> None:
        """wan_forward.py owns a TUN `wan0` in every internet namespace: one shaped hop per crossing."""
        nets = {}
        if set(self.nat.values()) == {"none"}:  # routed homes: packets carry the home host's own address
            nets = {f"192.168.{j + 1}.0/24": home for j, home in enumerate(self.homes)}
        spec = {"namespaces": self._internet(), "hosts": self.public + self.homes,
                "addrs": [self.addr(h) for h in self.public] + [self.wan_ip(h) for h in self.homes],
                "default": self.default, "links": {}, "nets": nets,
                "cleanup": list(self.namespaces)}  # the home hosts too, should our owner die
        forwarder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wan_forward.py")
        # own session: a Ctrl-C at the terminal must not cut the network while peers say goodbye
        self.forwarder = subprocess.Popen([sys.executable, forwarder, json.dumps(spec)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.forwarder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"nat_bed forwarder failed to start (exit {self.forwarder.poll()}): {line!r}")

    def _netns(self, ns: str) -> str:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        return ns

    def _attach(self, hub_dev: str, ns: str, dev: str, cidr: str) -> None:
        """Put ns on the internet: its TUN `wan0` (shaped), or a veth `dev` to the hub's bridge."""
        if self.shaped:
            dev = WAN_DEV
            _ip("-n", ns, "link", "set", dev, "mtu", "1500", "txqueuelen", "1000")  # as wan_bed.py's TUNs
        else:
            hub = self.tag + "hub"
            _ip("-n", hub, "link", "add", hub_dev, "type", "veth", "peer", "name", dev, "netns", ns)
            _ip("-n", hub, "link", "set", hub_dev, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", cidr, "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")

    def _home(self, j: int, home: str) -> None:
        router, host = self.router(home), self.ns(home)
        lan = f"192.168.{j + 1}."
        self._attach(f"r{j}", router, "wan0", f"{self.wan_ip(home)}/24")
        _ip("-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host)
        _ip("-n", router, "addr", "add", f"{lan}1/24", "dev", "lan0")
        _ip("-n", router, "link", "set", "lan0", "up")
        _ip("-n", host, "addr", "add", f"{lan}2/24", "dev", "eth0")
        _ip("-n", host, "link", "set", "eth0", "up")
        _ip("-n", host, "route", "add", "default", "via", f"{lan}1")
        _exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=2",
              "net.ipv4.conf.default.rp_filter=2")
        if self.nat[home] == "none":
            # plain routing: everyone on the internet (and every other router) knows the way in
            for other in self.public:
                _ip("-n", self.ns(other), "route", "add", f"{lan}0/24", "via", self.wan_ip(home))
            for k, other in enumerate(self.homes[:j]):  # (all homes of a "none" bed are "none")
                _ip("-n", self.router(other), "route", "add", f"{lan}0/24", "via", self.wan_ip(home))
                _ip("-n", router, "route", "add", f"192.168.{k + 1}.0/24", "via", self.wan_ip(other))
        else:
            subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=_nft_rules(self.nat[home]),
                           check=True, capture_output=True, text=True)


def leftovers() -> list[str]:
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.startswith(PREFIX)]
    return [n for n in names if not os.path.exists(f"/proc/{n[len(PREFIX):].split('-')[0]}")]


# ---------------------------------------------------------------------- probe
_CONNECT = """
import socket, sys, time
ip, port, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.time() + float(sys.argv[4])
while time.time() < deadline:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if local: s.bind(("0.0.0.0", local))
    s.settimeout(max(0.1, deadline - time.time()))
    try:
        s.connect((ip, port)); print("ok", flush=True); time.sleep(0.5); sys.exit(0)
    except OSError as e:
        err = e; s.close(); time.sleep(0.05)
print("fail", err, flush=True)
"""
_LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("up", flush=True); s.settimeout(10); s.accept()
"""


def tcp_connect(bed: NatBed, host: str, ip: str, port: int, local: int = 0, seconds: float = 2.0):
    return bed.run(host, [sys.executable, "-c", _CONNECT, ip, str(port), str(local), str(seconds)],
                   stdout=subprocess.PIPE, text=True)


def probe(bed: NatBed) -> dict:
    """Outbound works; unsolicited inbound does not; a TCP simultaneous open between two homes."""
    a, b = bed.homes[:2]
    server = bed.run(bed.public[0], [sys.executable, "-c", _LISTEN, "7001"], stdout=subprocess.PIPE, text=True)
    server.stdout.readline()
    out = tcp_connect(bed, a, bed.addr(bed.public[0]), 7001).communicate(timeout=30)[0].strip()
    inbound_server = bed.run(a, [sys.executable, "-c", _LISTEN, "7002"], stdout=subprocess.PIPE, text=True)
    inbound_server.stdout.readline()
    inbound = tcp_connect(bed, bed.public[0], bed.public_ip(a), 7002).communicate(timeout=30)[0].strip()
    inbound_server.kill()
    # both homes connect from port 7003 to the other's public address at the same moment
    started = time.monotonic()
    pa = tcp_connect(bed, a, bed.public_ip(b), 7003, local=7003, seconds=4)
    pb = tcp_connect(bed, b, bed.public_ip(a), 7003, local=7003, seconds=4)
    punch = [p.communicate(timeout=30)[0].strip() for p in (pa, pb)]
    result = {"outbound": out, "unsolicited_inbound": inbound, "punch": punch,
              "punch_s": round(time.monotonic() - started, 2)}
    if bed.shaped:  # UDP echo from behind the NAT: one crossing each way, so about 2 x delay
        rtts = sorted(bed.measure_rtt(a, bed.public[0], count=20))
        result["rtt_ms"] = {"answered": len(rtts), "min": round(rtts[0], 2), "median": round(rtts[len(rtts) // 2], 2),
                            "max": round(rtts[-1], 2)} if rtts else None
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["probe", "shell", "cleanup"])
    parser.add_argument("--nat", choices=NAT_KINDS, default="cone")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per crossing (0: no shaping)")
    parser.add_argument("--rate-mbit", type=float, default=None, help="rate per direction of each internet pair")
    parser.add_argument("--loss", type=float, default=0.0, help="loss probability per crossing")
    args = parser.parse_args()
    need_root()
    if args.command == "cleanup":
        stale = leftovers()
        _janitor(stale)
        print(f"removed {len(stale)} stale namespaces: {' '.join(stale)}")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with NatBed(["boot"], ["a", "b"], nat=args.nat, delay_ms=args.delay_ms, rate_mbit=args.rate_mbit,
                    loss=args.loss) as bed:
            shaping = f"{bed.default}" if bed.shaped else "none"
            print(f"internet: {'forwarder' if bed.shaped else 'bridge'}, shaping {shaping}")
            print(", ".join(f"{h} {bed.addr(h)} (public {bed.public_ip(h)}, netns {bed.ns(h)})" for h in bed.hosts))
            if args.command == "probe":
                print(f"nat={args.nat}: {probe(bed)}")
            else:
                print(f"enter a host: ip netns exec {bed.ns('a')} bash   (Ctrl-C here removes the bed)")
                signal.pause()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
