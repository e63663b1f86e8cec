"""The TUN forwarder of scripts/wan_bed.py: one process that is the "internet" between the bed's hosts.

    python scripts/wan_forward.py SPEC_JSON     (started by WanBed; stdin is its control pipe)

At start it enters every host namespace (setns), opens a TUN device `wan0` there and comes back,
then prints "ready". Each IPv4 packet a host sends into its TUN is looked up by destination
address (or, failing that, by the destination's /24 in the optional "nets" map {"A.B.C.0/24":
host}: networks routed behind a host, as scripts/nat_bed.py's un-NATed homes are) and goes through
the link (source, destination): Bernoulli loss, then serialisation at the link's rate behind what
the link already holds (tail drop beyond QUEUE_PACKETS of backlog), then the one-way delay; then
it is written into the destination's TUN. Why this shape: one epoll loop, one heap ordered by
release time and one timerfd armed (absolute, CLOCK_MONOTONIC) at the next release give
microsecond timing with no threads and no CPU while idle; Python's epoll timeout alone rounds up
to whole milliseconds. Same-link packets keep their order (their release times only grow).
Control: "stats" on stdin answers one JSON line of per-link counters; EOF on stdin means the owner
is gone: the forwarder removes the bed (processes in it by pid, its namespaces and those in the
optional "cleanup" list: the bed's namespaces without a TUN) and exits, so even a SIGKILLed owner
leaves nothing behind. Its TUN devices vanish with it. WAN_TRACE=FILE in its environment writes
a line per packet (arrival and release time, link, size): how TTFT was taken apart hop by hop.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time
from fcntl import ioctl

from wan_bed import DEV, QUEUE_PACKETS, _janitor

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x40000000, 0x400454CA, 0x0001, 0x1000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def _open_tun_in(ns: str, home: int) -> int:
    """A TUN device named DEV inside ns (entered with setns: nothing is ever made in our own namespace)."""
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        ioctl(fd, TUNSETIFF, struct.pack("16sH22x", DEV.encode(), IFF_TUN | IFF_NO_PI))
        return fd
    finally:
        os.close(target)
        _setns(home)


class _Link:
    __slots__ = ("delay", "rate", "loss", "busy", "packets", "bytes", "lost", "queue_drops")

    def __init__(self, delay_ms: float, rate_mbit: float | None, loss: float):
        self.delay, self.loss = delay_ms / 1000, loss
        self.rate = rate_mbit * 1e6 / 8 if rate_mbit else 0.0  # bytes per second; 0 = unlimited
        self.busy = 0.0  # when the link has finished serialising what it holds
        self.packets = self.bytes = self.lost = self.queue_drops = 0


def forward(spec: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides when the network goes
    try:
        os.nice(-10)  # the "network" must not wait behind the peers' compute for a CPU
    except OSError:
        pass
    names, hosts = spec["namespaces"], spec["hosts"]
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)  # to come back to after each setns
    fds = [_open_tun_in(ns, home) for ns in names]
    os.close(home)
    by_addr = {bytes(int(x) for x in a.split(".")): i for i, a in enumerate(spec["addrs"])}
    by_net = {}  # first three bytes of a /24 -> the host it is routed to
    for net, host in spec.get("nets", {}).items():
        prefix, bits = net.split("/")
        if bits != "24":
            raise ValueError(f"nets: only /24 networks are supported, not {net}")
        by_net[bytes(int(x) for x in prefix.split(".")[:3])] = hosts.index(host)
    remove = list(dict.fromkeys([*names, *spec.get("cleanup", [])]))
    links = [[_Link(**spec["links"].get(f"{a}>{b}", spec["default"])) for b in hosts] for a in hosts]
    queue_limit = QUEUE_PACKETS * 1500
    src_of = {fd: i for i, fd in enumerate(fds)}
    timer = _libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    ctl = sys.stdin.fileno()
    poll = select.epoll()
    for fd in (*fds, timer, ctl):
        poll.register(fd, select.EPOLLIN)
    heap: list = []
    seq, armed, rand, monotonic = 0, None, random.random, time.monotonic
    trace = open(os.environ["WAN_TRACE"], "w", buffering=1 << 20) if os.environ.get("WAN_TRACE") else None
    print("ready", flush=True)
    while True:
        for fd, _ in poll.poll():
            if fd == timer:
                try:
                    os.read(timer, 8)
                except BlockingIOError:
                    pass
            elif fd == ctl:
                line = sys.stdin.readline()
                if not line:  # the owner is gone: clean up after it, whatever happened to it
                    if trace is not None:
                        trace.close()
                    _janitor(remove)
                    return
                payload = {f"{hosts[a]}>{hosts[b]}": {"packets": l.packets, "bytes": l.bytes, "lost": l.lost,
                                                      "queue_drops": l.queue_drops}
                           for a, row in enumerate(links) for b, l in enumerate(row) if l.packets}
                print(json.dumps(payload), flush=True)
            else:
                src, now = src_of[fd], monotonic()
                for _ in range(64):  # a bounded batch per fd keeps the other links' releases on time
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if packet[0] >> 4 != 4:
                        continue
                    dst = by_addr.get(packet[16:20])
                    if dst is None:
                        dst = by_net.get(packet[16:19])
                    if dst is None or dst == src:
                        continue
                    link = links[src][dst]
                    size = len(packet)
                    link.packets += 1
                    link.bytes += size
                    if link.loss and rand() < link.loss:
                        link.lost += 1
                        continue
                    if link.rate:
                        if (link.busy - now) * link.rate > queue_limit:
                            link.queue_drops += 1
                            continue
                        link.busy = max(now, link.busy) + size / link.rate
                        due = link.busy + link.delay
                    else:
                        due = now + link.delay
                    seq += 1
                    if trace is not None:
                        trace.write(f"{now:.6f} {due:.6f} {hosts[src]} {hosts[dst]} {size}\n")
                    heapq.heappush(heap, (due, seq, fds[dst], packet))
        now = monotonic() + 20e-6  # what is due within 20 µs goes now (saves a wake-up per packet)
        while heap and heap[0][0] <= now:
            _, _, fd, packet = heapq.heappop(heap)
            try:
                os.write(fd, packet)
            except OSError:
                pass  # a full TUN queue in the receiver drops, as a real NIC would
        if heap and heap[0][0] != armed:
            armed = heap[0][0]
            sec = int(armed)
            spec_t = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((armed - sec) * 1e9)))
            _libc.timerfd_settime(timer, 1, ctypes.byref(spec_t), None)  # 1: TFD_TIMER_ABSTIME


if __name__ == "__main__":
    forward(json.loads(sys.argv[1]))
