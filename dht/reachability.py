"""Can others dial us? Ask peers to dial us back on a fresh connection (/molink/dialback/1.0.0).

py-libp2p 0.8.1's AutoNAT v1 reports a dead address as public (DESIGN.md §3 trap 8), so a peer
finds out for itself: it asks a few peers it is connected to ("helpers") to open a NEW TCP
connection to each of its listen ports and run the Noise handshake on it. Noise proves that the
peer answering holds our key, so a NAT that forwards the port to another machine, or another
libp2p node behind the same address, does not count. The helper reports the IP it saw us come
from; that is our public IP.

Not an open dialer for strangers: the helper dials ONLY the IP the asker's own connection comes
from (the asker sends ports and a nonce, never an address to dial), refuses askers on relayed
connections (their IP would be the relay's), tries at most MAX_PORTS ports per request, rate-limits
per asker IP, and runs a bounded number of dial-backs at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.transport.tcp.tcp import TCP

from molink.dht.control import ControlError, checked_ip, is_relayed_stream, read_control, remote_ip, write_control
from molink.dht.host import guard_handler

logger = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/molink/dialback/1.0.0"
REQUEST, RESULT, REFUSED = "dialback", "dialback-result", "refused"
NONCE_BYTES = 16
MAX_PORTS = 4
DIAL_TIMEOUT = 3.0  # TCP + Noise on a fresh connection; a NAT that drops the SYN costs exactly this
ASK_TIMEOUT = 2 * DIAL_TIMEOUT * MAX_PORTS + 2.0
MAX_CONCURRENT_DIALBACKS = 8
PER_IP_INTERVAL = 10.0  # one request per asker IP per this many seconds (a burst of PER_IP_BURST)
PER_IP_BURST = 3
MAX_TRACKED_IPS = 4096

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"
REACHABILITY_VALUES = (PUBLIC, PRIVATE, UNKNOWN)


@dataclass
class Reachability:
    status: str = UNKNOWN  # public: some helper reached us; private: helpers answered, none reached us
    observed_ip: str | None = None
    helpers: dict[str, bool] = field(default_factory=dict)  # helper peer id -> reached us?

    def describe(self) -> str:
        asked = ", ".join(f"{peer[-8:]}={'yes' if ok else 'no'}" for peer, ok in self.helpers.items()) or "nobody"
        return f"{self.status} (public IP {self.observed_ip or '?'}; dial-back by {asked})"


class DialbackHelper:
    """The helper side, served by every peer (rate-limited; dials only the asker's own IP)."""

    def __init__(self, host: Any):
        self.host = host
        self._dialing = trio.CapacityLimiter(MAX_CONCURRENT_DIALBACKS)
        self._tokens: dict[str, tuple[float, float]] = {}  # ip -> (tokens, last refill)

    def register(self) -> None:
        self.host.set_stream_handler(DIALBACK_PROTOCOL, guard_handler(self.handle, DIALBACK_PROTOCOL))

    def _allow(self, ip: str) -> bool:
        now = time.monotonic()
        if len(self._tokens) > MAX_TRACKED_IPS:
            self._tokens = {k: v for k, v in self._tokens.items() if now - v[1] < PER_IP_INTERVAL * PER_IP_BURST}
        tokens, last = self._tokens.get(ip, (float(PER_IP_BURST), now))
        tokens = min(float(PER_IP_BURST), tokens + (now - last) / PER_IP_INTERVAL)
        if tokens < 1.0:
            self._tokens[ip] = (tokens, now)
            return False
        self._tokens[ip] = (tokens - 1.0, now)
        return True

    async def handle(self, stream: Any) -> None:
        try:
            request = await read_control(stream)
            nonce, ports = request.body.get("nonce"), request.body.get("ports")
            ip = remote_ip(stream)
            reason = None
            if request.type != REQUEST or not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES \
                    or not isinstance(ports, list) or not 0 < len(ports) <= MAX_PORTS \
                    or not all(type(p) is int and 0 < p < 65536 for p in ports):
                reason = "malformed request"
            elif ip is None or is_relayed_stream(stream):
                reason = "cannot see your address (relayed connection?)"
            elif not self._allow(ip):
                reason = "rate limited"
            if reason is not None:
                await write_control(stream, REFUSED, {"nonce": nonce if isinstance(nonce, bytes) else b"",
                                                      "reason": reason})
                return
            asker = stream.muxed_conn.peer_id
            reached = [False] * len(ports)

            async def one(index: int, port: int) -> None:
                async with self._dialing:
                    reached[index] = await dial_back(self.host, ip, port, asker)

            async with trio.open_nursery() as nursery:
                for index, port in enumerate(dict.fromkeys(ports)):
                    nursery.start_soon(one, index, port)
            await write_control(stream, RESULT, {"nonce": nonce, "ip": ip, "reached": reached})
        except ControlError as exc:
            logger.debug("dial-back request failed: %s", exc)


async def dial_back(host: Any, ip: str, port: int, peer_id: ID, timeout: float = DIAL_TIMEOUT) -> bool:
    """A fresh TCP connection to ip:port that completes a Noise handshake with `peer_id`."""
    family = "ip6" if ":" in ip else "ip4"
    raw = None
    try:
        with trio.fail_after(timeout):
            # The swarm's own TCP transport (a private swarm's key proof included), dialled directly:
            # the swarm itself would reuse the connection it already has to the asker.
            target = multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}")
            manager = getattr(host.get_network(), "transport_manager", None)
            transport = manager.transport_for_dialing(target) if manager is not None else None
            raw = await (transport or TCP()).dial(target)
            secured = await host.get_network().upgrader.upgrade_security(raw, True, peer_id)
        await _close(secured)
        return True
    except Exception as exc:  # timeouts, refusals, a Noise handshake with the wrong key
        logger.debug("dial-back to %s:%d failed: %r", ip, port, exc)
        if raw is not None:
            await _close(raw)
        return False


async def _close(conn: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await conn.close()
        except Exception:
            pass


def tcp_ports(addrs: Sequence[Any]) -> list[int]:
    ports = []
    for addr in addrs:
        text = str(addr)
        if "/p2p-circuit" in text or "/tcp/" not in text:
            continue
        try:
            ports.append(int(text.split("/tcp/", 1)[1].split("/", 1)[0]))
        except ValueError:
            continue
    return list(dict.fromkeys(ports))[:MAX_PORTS]


async def ask_dialback(host: Any, helper: ID, ports: list[int], timeout: float = ASK_TIMEOUT) -> tuple[bool, str | None] | None:
    """(reached on any port, our IP as the helper saw it), or None if the helper did not answer."""
    nonce = os.urandom(NONCE_BYTES)
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(helper, [DIALBACK_PROTOCOL])
            try:
                await write_control(stream, REQUEST, {"nonce": nonce, "ports": ports})
                answer = await read_control(stream, timeout)
            finally:
                await _close(stream)
    except Exception as exc:  # no such protocol, a dead helper, a timeout
        logger.debug("dial-back request to %s failed: %r", helper, exc)
        return None
    reached = answer.body.get("reached")
    if answer.type != RESULT or answer.body.get("nonce") != nonce or not isinstance(reached, list) \
            or len(reached) > MAX_PORTS or not all(isinstance(r, bool) for r in reached):
        logger.info("dial-back by %s: %s %r", helper, answer.type, answer.body.get("reason"))
        return None
    return any(reached), checked_ip(answer.body.get("ip"))


async def check_reachability(host: Any, helpers: Sequence[ID], listen_addrs: Sequence[Any] | None = None,
                             *, wanted: int = 3) -> Reachability:
    """Ask up to `wanted` helpers at once; public as soon as one reached us (a lying helper can only
    make a NATed peer try to serve directly, which its clients notice and route around)."""
    ports = tcp_ports(listen_addrs if listen_addrs is not None else host.get_addrs())
    result = Reachability()
    if not ports:
        return result
    helpers = [h for h in dict.fromkeys(helpers) if h != host.get_id()][:wanted]

    async def one(helper: ID) -> None:
        answer = await ask_dialback(host, helper, ports)
        if answer is not None:
            result.helpers[helper.to_base58()] = answer[0]
            result.observed_ip = result.observed_ip or answer[1]

    async with trio.open_nursery() as nursery:
        for helper in helpers:
            nursery.start_soon(one, helper)
    if result.helpers:
        result.status = PUBLIC if any(result.helpers.values()) else PRIVATE
    return result
