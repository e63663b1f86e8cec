"""Our own circuit relay: a public peer carries a libp2p connection between two peers that cannot
dial each other (a volunteer behind a home NAT, and a client or another peer).

Why not py-libp2p 0.8.1's circuit relay v2 (libp2p/relay/circuit_v2/protocol.py): its relay side
keys the streams of a circuit by peer id (`_handle_connect` stores `self._active_relays[peer_id] =
(stream, dst_stream)`, and `_relay_data`'s `finally` closes whatever `_active_relays[peer_id]` holds
when ITS circuit ends). A NATed peer serving a swarm has several circuits at once (the client, the
previous peer's pushes, DHT lookups): the second circuit overwrites the first's entry, and when the
first ends it closes the second's streams. Its copy loop also treats a yamux EOF as an error and
retries it three times with sleeps. The end-to-end part is fine and is what we reuse: a relayed
byte stream wrapped in libp2p's RawConnection and upgraded (Noise + yamux) by the swarm itself, so
the relay only ever sees ciphertext and cannot impersonate either end (Noise checks the peer id).

Protocol (control frames from molink.dht.control, then raw bytes):
  NATed peer -> relay, /molink/relay/1.0.0: `reserve` -> `reserved` {ttl, ip (as the relay sees
    us), limits} or `refused` {reason}. Renewed on a fresh stream before the ttl runs out.
  dialer -> relay, /molink/relay/1.0.0: `connect` {peer} -> relay -> target over the target's OWN
    connection (never dialled), /molink/relay-stop/1.0.0: `stop` {peer, ip, limits} -> `ok`; relay ->
    dialer: `ok` {ip of the target, limits}; then both streams are one pipe. Each end learns the
    other's public IP from the relay: that is what hole punching (holepunch.py) aims at, so punches
    only ever go to an address a third party saw the other end connect from.
Limits at the relay: reservations (total and per IP), circuits (total and per target), bytes and
seconds per circuit. A relay refuses reservations and circuits over relayed connections.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID

from molink.dht.control import (
    ControlError,
    checked_ip,
    is_relayed_stream,
    read_control,
    remote_ip,
    write_control,
)
from molink.dht.host import guard_handler

logger = logging.getLogger(__name__)

RELAY_PROTOCOL = "/molink/relay/1.0.0"
RELAY_STOP_PROTOCOL = "/molink/relay-stop/1.0.0"
RESERVE, RESERVED, CONNECT, STOP, OK, REFUSED = "reserve", "reserved", "connect", "stop", "ok", "refused"
HANDSHAKE_TIMEOUT = 10.0
PIPE_CHUNK = 64 * 1024
MAX_PEER_ID_CHARS = 64
MAX_REMEMBERED_IPS = 4096


@dataclass(frozen=True)
class RelayLimits:
    max_reservations: int = 64
    max_reservations_per_ip: int = 8  # a home with several volunteers behind one NAT
    reservation_ttl: float = 120.0
    max_circuits: int = 256
    max_circuits_per_peer: int = 32
    circuit_bytes: int = 1 << 30  # both directions together; then the circuit is reset
    circuit_seconds: float = 3600.0


@dataclass
class _Reservation:
    expires: float
    ip: str | None


def mark_relayed(conn: Any) -> None:
    """Tag a muxed connection as relayed (its remote address is the relay's, not the peer's)."""
    muxed = getattr(conn, "muxed_conn", conn)
    try:
        muxed.molink_relayed = True
    except Exception:
        pass


def peer_ips(host: Any) -> dict[str, str]:
    """Per host: peer id -> public IP a relay saw that peer connect from (hole punching aims there)."""
    table = getattr(host, "_molink_relay_peer_ips", None)
    if table is None:
        table = {}
        host._molink_relay_peer_ips = table
    return table


def remember_peer_ip(host: Any, peer: str, ip: str) -> None:
    table = peer_ips(host)
    table.pop(peer, None)
    table[peer] = ip
    while len(table) > MAX_REMEMBERED_IPS:  # oldest first: a long-lived relay client meets many peers
        del table[next(iter(table))]


def _peer_id(value: Any) -> ID:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_CHARS:
        raise ControlError("bad peer id")
    try:
        return ID.from_base58(value)
    except Exception as exc:
        raise ControlError("bad peer id") from exc


def circuit_addr(relay_addr: str, target: str) -> str:
    """<relay address with /p2p/relay>/p2p-circuit/p2p/<target>."""
    return f"{relay_addr}/p2p-circuit/p2p/{target}"


def split_circuit_addr(addr: multiaddr.Multiaddr | str) -> tuple[str, ID, ID]:
    """(relay address with /p2p/<relay>, relay id, target id) of a circuit address."""
    text = str(addr)
    relay_part, sep, rest = text.partition("/p2p-circuit")
    if not sep or "/p2p/" not in relay_part:
        raise ValueError(f"not a circuit address: {text}")
    relay_id = _peer_id(relay_part.rsplit("/p2p/", 1)[1])
    target = rest.removeprefix("/p2p/") if rest else ""
    return relay_part, relay_id, _peer_id(target) if target else None


# ---------------------------------------------------------------------------- the relay itself


class RelayService:
    """Served by publicly reachable peers: reservations for NATed peers, circuits to them."""

    def __init__(self, host: Any, limits: RelayLimits = RelayLimits()):
        self.host = host
        self.limits = limits
        self.reservations: dict[ID, _Reservation] = {}
        self.circuits: dict[ID, int] = {}  # target -> open circuits
        self.stats = {"reservations": 0, "circuits": 0, "refused": 0, "bytes": 0}

    def register(self) -> None:
        self.host.set_stream_handler(RELAY_PROTOCOL, guard_handler(self.handle, RELAY_PROTOCOL))

    @property
    def open_circuits(self) -> int:
        return sum(self.circuits.values())

    async def handle(self, stream: Any) -> None:
        try:
            if is_relayed_stream(stream):
                await write_control(stream, REFUSED, {"reason": "no relaying over a relayed connection"})
                return
            request = await read_control(stream, HANDSHAKE_TIMEOUT)
            if request.type == RESERVE:
                await self._reserve(stream)
            elif request.type == CONNECT:
                await self._connect(stream, request.body)
            else:
                await write_control(stream, REFUSED, {"reason": "expected reserve or connect"})
        except ControlError as exc:
            logger.debug("relay request failed: %s", exc)

    def _expire(self) -> None:
        now = time.monotonic()
        for peer in [p for p, r in self.reservations.items() if r.expires < now]:
            del self.reservations[peer]

    async def _reserve(self, stream: Any) -> None:
        peer, ip = stream.muxed_conn.peer_id, remote_ip(stream)
        self._expire()
        existing = self.reservations.get(peer)
        if existing is None or existing.ip != ip:  # a renewal from a new IP takes a slot of that IP
            same_ip = sum(r.ip == ip for p, r in self.reservations.items() if p != peer)
            if (existing is None and len(self.reservations) >= self.limits.max_reservations) \
                    or same_ip >= self.limits.max_reservations_per_ip:
                self.stats["refused"] += 1
                await write_control(stream, REFUSED, {"reason": "no reservation slot free"})
                return
            logger.info("relay: reservation for %s (%s)", peer, ip)
        self.reservations[peer] = _Reservation(time.monotonic() + self.limits.reservation_ttl, ip)
        self.stats["reservations"] = len(self.reservations)
        await write_control(stream, RESERVED, {"ttl": self.limits.reservation_ttl, "ip": ip or "",
                                               "limits": asdict(self.limits)})

    async def _connect(self, stream: Any, body: dict) -> None:
        source = stream.muxed_conn.peer_id
        try:
            target = _peer_id(body.get("peer"))
        except ControlError:
            self.stats["refused"] += 1
            await write_control(stream, REFUSED, {"reason": "bad peer id"})
            return
        self._expire()
        reservation = self.reservations.get(target)
        reason = None
        if reservation is None:
            reason = "the peer has no reservation here"
        elif not self.host.get_network().get_connections(target):
            reason = "the peer is not connected to this relay"  # never dial on a stranger's behalf
        elif self.open_circuits >= self.limits.max_circuits or \
                self.circuits.get(target, 0) >= self.limits.max_circuits_per_peer:
            reason = "circuit limit reached"
        if reason is not None:
            self.stats["refused"] += 1
            await write_control(stream, REFUSED, {"reason": reason})
            return
        self.circuits[target] = self.circuits.get(target, 0) + 1
        stop = None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                stop = await self.host.new_stream(target, [RELAY_STOP_PROTOCOL])
            limits = {"bytes": self.limits.circuit_bytes, "seconds": self.limits.circuit_seconds}
            await write_control(stop, STOP, {"peer": source.to_base58(), "ip": remote_ip(stream) or "",
                                             "limits": limits})
            answer = await read_control(stop, HANDSHAKE_TIMEOUT)
            if answer.type != OK:
                raise ControlError(f"the peer refused the circuit: {answer.body.get('reason')!r}")
            await write_control(stream, OK, {"ip": reservation.ip or "", "limits": limits})
            self.stats["circuits"] += 1
            await self._pipe(stream, stop)
        except (ControlError, trio.TooSlowError, Exception) as exc:
            if isinstance(exc, ControlError) or isinstance(exc, trio.TooSlowError):
                logger.debug("relay circuit %s -> %s failed: %s", source, target, exc)
            else:
                logger.info("relay circuit %s -> %s failed: %r", source, target, exc)
            try:
                await write_control(stream, REFUSED, {"reason": "could not reach the peer"}, timeout=1.0)
            except ControlError:
                pass
        finally:
            self.circuits[target] -= 1
            if not self.circuits[target]:
                del self.circuits[target]
            if stop is not None:
                await _reset(stop)
            await _reset(stream)

    async def _pipe(self, a: Any, b: Any) -> None:
        """Copy both ways until both ends closed, or a limit (bytes, seconds) is reached."""
        budget = [self.limits.circuit_bytes]

        async def copy(src: Any, dst: Any) -> None:
            while True:
                try:
                    data = await src.read(PIPE_CHUNK)
                except EOFError:
                    data = b""
                if not data:
                    await dst.close()  # pass the half-close on; the other direction goes on
                    return
                budget[0] -= len(data)
                self.stats["bytes"] += len(data)
                if budget[0] < 0:
                    raise ControlError("circuit byte limit reached")
                await dst.write(data)

        with trio.move_on_after(self.limits.circuit_seconds):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(copy, a, b)
                    nursery.start_soon(copy, b, a)
            except BaseExceptionGroup as group:
                if group.subgroup(trio.Cancelled) is not None and group.subgroup(Exception) is None:
                    raise
                logger.debug("relay circuit ended: %r", group.exceptions[0])


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception:
            pass


# ---------------------------------------------------------------------------- the two ends


async def dial_relayed(host: Any, addr: multiaddr.Multiaddr | str, timeout: float = HANDSHAKE_TIMEOUT) -> ID:
    """Open a libp2p connection to the target of a circuit address through its relay."""
    from molink.dht.host import connect_peer

    relay_addr, relay_id, target = split_circuit_addr(addr)
    if target is None:
        raise ValueError(f"circuit address without a target peer: {addr}")
    await connect_peer(host, relay_addr, timeout=timeout)
    with trio.fail_after(timeout):
        stream = await host.new_stream(relay_id, [RELAY_PROTOCOL])
    try:
        await write_control(stream, CONNECT, {"peer": target.to_base58()})
        answer = await read_control(stream, timeout)
        if answer.type != OK:
            raise ConnectionError(f"relay {relay_id} refused: {answer.body.get('reason')!r}")
        ma = multiaddr.Multiaddr(circuit_addr(relay_addr, target.to_base58()))
        raw = RawConnection(stream, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[ma])
        with trio.fail_after(timeout):
            conn = await host.upgrade_outbound_connection(raw, target)  # Noise checks it IS the target
    except BaseException:
        await _reset(stream)
        raise
    mark_relayed(conn)
    ip = checked_ip(answer.body.get("ip"))
    if ip:
        remember_peer_ip(host, target.to_base58(), ip)
    logger.info("connected to %s through relay %s", target, relay_id)
    return target


class RelayedListener:
    """The NATed side: accepts circuits, but only from relays it holds a reservation with."""

    def __init__(self, host: Any):
        self.host = host
        self.relays: set[ID] = set()  # kept up to date by RelayReservations

    def register(self) -> None:
        # The handler lives as long as the relayed connection (its stream IS the connection).
        self.host.set_stream_handler(RELAY_STOP_PROTOCOL,
                                     guard_handler(self.handle_stop, RELAY_STOP_PROTOCOL, close_on_return=False))

    async def handle_stop(self, stream: Any) -> None:
        relay_id = stream.muxed_conn.peer_id
        try:
            request = await read_control(stream, HANDSHAKE_TIMEOUT)
            if relay_id not in self.relays or request.type != STOP:
                await write_control(stream, REFUSED, {"reason": "no reservation with this relay"})
                await _reset(stream)
                return
            source = _peer_id(request.body.get("peer"))
            await write_control(stream, OK, {})
        except ControlError as exc:
            logger.debug("relayed connection from %s refused: %s", relay_id, exc)
            await _reset(stream)
            return
        ma = multiaddr.Multiaddr(f"/p2p/{relay_id.to_base58()}/p2p-circuit/p2p/{source.to_base58()}")
        raw = RawConnection(stream, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[ma])
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                muxed = await self.host.upgrade_inbound_connection(raw, ma)
        except Exception as exc:
            logger.info("relayed connection from %s via %s failed: %r", source, relay_id, exc)
            await _reset(stream)
            return
        mark_relayed(muxed)
        if muxed.peer_id != source:  # the relay named someone else than who proved its key
            logger.info("relay %s named %s but %s connected; dropped", relay_id, source, muxed.peer_id)
            await muxed.close()
            return
        ip = checked_ip(request.body.get("ip"))
        if ip:
            remember_peer_ip(self.host, source.to_base58(), ip)
        logger.info("relayed connection from %s via %s", source, relay_id)
        closed = getattr(muxed, "event_closed", None)
        if closed is not None:
            await closed.wait()
