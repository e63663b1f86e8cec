"""Direct data channels: the inference hot path on a plain TCP socket, keyed through libp2p.

Why: on loopback a MoLink frame through py-libp2p (yamux windows, its Python Noise writer and
reader tasks, multistream) costs ~1 ms of CPU per hop, 4-5x the span compute of a small model.
The swarm still uses libp2p for everything that needs it (identities, the DHT, NAT traversal,
session control), and uses it here to hand out a *ticket*: over the Noise-authenticated libp2p
stream the serving peer sends the dialer a fresh 32-byte secret, a 16-byte ticket and a TCP port.
The dialer connects to that port, presents the ticket and proves it holds the secret; from then
on both directions are ChaCha20-Poly1305 records with per-direction keys (HKDF of the secret)
and counter nonces, so the channel is exactly as private and authenticated as the libp2p stream
it stands in for, and a replayed, reordered or forged record fails authentication.

Records and lanes (several TCP connections per channel on long paths): dht/direct_channel.py.

A DirectChannel speaks the small part of libp2p's INetStream that FramedStream uses (read,
write, close, reset), so every protocol handler serves both transports unchanged. When anything
about the direct path fails (the peer does not offer it, the port is unreachable behind a NAT)
`dial_framed_direct` falls back to a libp2p stream.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import multiaddr
import trio

from molink.dht.direct_channel import (  # noqa: F401 - re-exported: the channel is part of this API
    CONNECT_TIMEOUT,
    HELLO,
    LANE_MAGIC,
    LANE_RTT,
    MAGIC,
    MAX_LANES,
    RECORD_HEADER,
    SECRET_BYTES,
    SOCKET_ERRORS,
    TAG_BYTES,
    TICKET_BYTES,
    WELCOME,
    DirectChannel,
    DirectChannelError,
    _channel_keys,
    _lane_hello,
    _receive_exactly,
    dialer_handshake,
    lanes_for,
)
from molink.dht.host import guard_handler
from molink.dht.streams import (
    STREAM_ERRORS,
    FramedStream,
    StreamOpenTimeout,
    dial_framed,
    open_framed_stream,
    open_raw_stream,
)
from molink.dht.wire import Frame

logger = logging.getLogger(__name__)

DIRECT_PROTOCOL = "/molink/direct/1.0.0"
TICKET, ERROR = "ticket", "error"
TICKET_TTL = 10.0
MAX_TICKETS = 1024
MAX_TICKETS_PER_PEER = 64
HANDSHAKE_TIMEOUT = 3.0  # from TCP accept to a verified hello: slowloris sockets are dropped
MAX_HANDSHAKING = 64
@dataclass(eq=False)
class _Ticket:
    secret: bytes
    protocol: str
    peer: str
    expires: float
    lanes: int = 1  # what lane 0's hello asked for (MAX_LANES at most)
    extra: dict[int, trio.SocketStream] = field(default_factory=dict)  # verified extra lanes by index
    arrived: trio.Event = field(default_factory=trio.Event)  # another extra lane came in
    formed: trio.Event = field(default_factory=trio.Event)  # lane 0 finished gathering (channel or not)
    channel: DirectChannel | None = None


class DirectListener:
    """Accepts direct channels for the protocols in `handlers` (protocol id -> stream handler,
    the same callables that are registered on the libp2p host)."""

    def __init__(self, handlers: dict[str, Callable[[Any], Awaitable[None]]], bind_ip: str = "127.0.0.1",
                 port: int = 0):
        self.handlers = {proto: guard_handler(h, f"{proto} (direct)") for proto, h in handlers.items()}
        self.bind_ip = bind_ip
        self.port = port
        self._tickets: dict[bytes, _Ticket] = {}
        self._handshaking = trio.CapacityLimiter(MAX_HANDSHAKING)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._serve_connection, self.port, host=self.bind_ip))
            self.port = listeners[0].socket.getsockname()[1]
            logger.info("direct data channels on %s:%d", self.bind_ip, self.port)
            task_status.started(self.port)

    # ------------------------------------------------------------ tickets (asked for over libp2p)

    def issue(self, protocol: str, peer: str) -> tuple[bytes, bytes]:
        if protocol not in self.handlers:
            raise ValueError(f"no direct channel for {protocol!r}")
        now = trio.current_time()
        for key in [k for k, t in self._tickets.items() if t.expires < now]:
            del self._tickets[key]
        if len(self._tickets) >= MAX_TICKETS or sum(t.peer == peer for t in self._tickets.values()) >= MAX_TICKETS_PER_PEER:
            raise ValueError("too many unused tickets")
        ticket, secret = os.urandom(TICKET_BYTES), os.urandom(SECRET_BYTES)
        self._tickets[ticket] = _Ticket(secret, protocol, peer, now + TICKET_TTL)
        return ticket, secret

    async def handle_ticket_request(self, framed: FramedStream) -> None:
        """libp2p handler for DIRECT_PROTOCOL: one request, one ticket (or an error)."""
        try:
            request = await framed.receive(timeout=CONNECT_TIMEOUT)
            protocol = request.body.get("protocol")
            peer = str(getattr(getattr(framed.stream, "muxed_conn", None), "peer_id", "?"))
            try:
                if request.type != TICKET or not isinstance(protocol, str):
                    raise ValueError("expected a ticket request naming a protocol")
                ticket, secret = self.issue(protocol, peer)
            except ValueError as exc:
                await framed.send(Frame(ERROR, request.request_id, {"message": str(exc)}))
                return
            await framed.send(Frame(TICKET, request.request_id, {"port": self.port, "ticket": ticket, "secret": secret}))
        except STREAM_ERRORS:
            return

    # ------------------------------------------------------------ accepted sockets

    async def _serve_connection(self, sock: trio.SocketStream) -> None:
        result = None
        async with self._handshaking:
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                try:
                    result = await self._handshake(sock)
                except (DirectChannelError, trio.BrokenResourceError, OSError) as exc:
                    logger.debug("direct handshake refused: %s", exc)
        if result is None:
            with contextlib.suppress(*SOCKET_ERRORS):
                await sock.aclose()
            return
        if isinstance(result, _Ticket):  # an extra lane: its socket is the channel's until it closes
            await self._hold_lane(result, sock)
            return
        channel, entry = result
        try:
            if entry.lanes > 1 and not await self._gather_lanes(channel, entry):
                return
            await channel.write(WELCOME)
            channel.remote_peer = entry.peer if entry.peer != "?" else None  # per-client caps (session_limits.py)
            await self.handlers[entry.protocol](channel)
        finally:
            await channel.aclose_socket()

    async def _handshake(self, sock: trio.SocketStream) -> tuple[DirectChannel, _Ticket] | _Ticket | None:
        """Lane 0 (MAGIC): (its channel, the ticket); an extra lane (LANE_MAGIC): the ticket it joins."""
        opening = await _receive_exactly(sock, len(MAGIC) + TICKET_BYTES)
        if opening is None:
            return None
        magic, ticket = opening[:len(MAGIC)], opening[len(MAGIC):]
        if magic not in (MAGIC, LANE_MAGIC):
            raise DirectChannelError("not a MoLink direct channel")
        entry = self._tickets.get(ticket)
        if entry is None or entry.expires < trio.current_time():
            raise DirectChannelError("unknown or expired ticket")
        if magic == LANE_MAGIC:
            return await self._lane_handshake(sock, ticket, entry)
        to_listener, to_dialer = _channel_keys(entry.secret, ticket)
        channel = DirectChannel(sock, send_key=to_dialer, receive_key=to_listener)
        hello = await channel.read_record()  # proves the dialer holds the secret
        lanes = 1 if hello == HELLO else (hello[-1] if hello and hello[:-1] == HELLO else 0)
        if not 1 <= lanes <= MAX_LANES or entry.channel is not None:
            raise DirectChannelError("bad hello")
        entry.lanes, entry.channel = lanes, channel
        if lanes == 1:
            del self._tickets[ticket]  # single use, spent only by someone who proved the secret
        return channel, entry

    async def _lane_handshake(self, sock: trio.SocketStream, ticket: bytes, entry: _Ticket) -> _Ticket:
        sealed_size = len(HELLO) + TAG_BYTES
        rest = await _receive_exactly(sock, 1 + RECORD_HEADER.size + sealed_size)
        if rest is None:
            raise DirectChannelError("EOF in a lane hello")
        lane = rest[0]
        if not 1 <= lane < MAX_LANES or lane in entry.extra or \
                rest[1:] != RECORD_HEADER.pack(sealed_size) + _lane_hello(entry.secret, ticket, lane):
            raise DirectChannelError("bad lane hello")
        entry.extra[lane] = sock
        entry.arrived.set()
        return entry

    async def _gather_lanes(self, channel: DirectChannel, entry: _Ticket) -> bool:
        """Lane 0 waits for the other lanes of its ticket, then the ticket is spent either way."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            while len(entry.extra) < entry.lanes - 1:
                entry.arrived = trio.Event()
                await entry.arrived.wait()
        self._tickets = {t: e for t, e in self._tickets.items() if e is not entry}
        complete = sorted(entry.extra) == list(range(1, entry.lanes))
        if complete:
            channel.add_lanes([entry.extra[lane] for lane in range(1, entry.lanes)])
        else:
            entry.channel = None
            logger.debug("direct channel: %d of %d lanes came; refused", len(entry.extra) + 1, entry.lanes)
        entry.formed.set()
        return complete

    @staticmethod
    async def _hold_lane(entry: _Ticket, sock: trio.SocketStream) -> None:
        """Keep an extra lane's accept task (trio closes its socket on return) until its channel ends."""
        with trio.move_on_after(2 * HANDSHAKE_TIMEOUT):
            await entry.formed.wait()
        channel = entry.channel
        if channel is not None and sock in channel.lanes:
            await channel.closed_event.wait()
        with contextlib.suppress(*SOCKET_ERRORS):
            await sock.aclose()


# -------------------------------------------------------------------- the dialing side


def tcp_ip_of(addrs: Sequence[str]) -> str | None:
    """The IP of the first plain TCP address (not a relay circuit) among announced multiaddrs."""
    for addr in addrs:
        try:
            maddr = multiaddr.Multiaddr(addr)
            names = [p.name for p in maddr.protocols()]
        except Exception:
            continue
        if "p2p-circuit" in names or len(names) < 2 or names[1] != "tcp":
            continue
        if names[0] in ("ip4", "ip6"):
            return maddr.value_for_protocol(names[0])
    return None


async def _request_ticket(host: Any, peer_id: Any, protocol: str, timeout: float) -> tuple[int, bytes, bytes]:
    async with dial_framed(host, peer_id, DIRECT_PROTOCOL, open_timeout=timeout) as framed:
        reply = await framed.request(Frame(TICKET, 1, {"protocol": protocol}), timeout=timeout)
    body = reply.body
    port, ticket, secret = body.get("port"), body.get("ticket"), body.get("secret")
    if reply.type != TICKET:
        raise DirectChannelError(f"no ticket: {body.get('message')!r}")
    if not (isinstance(port, int) and 0 < port < 65536 and isinstance(ticket, bytes) and len(ticket) == TICKET_BYTES
            and isinstance(secret, bytes) and len(secret) == SECRET_BYTES):
        raise DirectChannelError("malformed ticket")
    return port, ticket, secret


_connect_times: dict[str, float] = {}  # IP -> the quickest TCP connect to it seen: its round trip


def _note_connect_time(ip: str, seconds: float) -> None:
    """Keep the quickest connect seen per IP: one slow sample (a loaded machine's scheduling delay, a
    retransmitted SYN) must not make a short path look long for good. Loopback is never long."""
    if _is_loopback(ip):
        seconds = 0.0
    known = _connect_times.get(ip)
    _connect_times[ip] = seconds if known is None else min(seconds, known)
    if len(_connect_times) > 4096:
        del _connect_times[next(iter(_connect_times))]


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


async def open_direct_channel(host: Any, peer_id: Any, ip: str, protocol: str,
                              timeout: float = CONNECT_TIMEOUT) -> DirectChannel:
    port, ticket, secret = await _request_ticket(host, peer_id, protocol, timeout)
    known = _connect_times.get(ip)
    extra: list[trio.SocketStream] = []

    async def timed_connect() -> trio.SocketStream:
        started = trio.current_time()
        sock = await trio.open_tcp_stream(ip, port)
        _note_connect_time(ip, trio.current_time() - started)
        return sock

    try:
        with trio.fail_after(timeout):
            if known is not None and lanes_for(known) > 1:  # a known long path: every lane at once
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_connect_lanes, ip, port, lanes_for(known) - 1, extra)
                    sock = await timed_connect()  # timed still: a quicker sample can shorten the path
            else:  # unknown (or short): time lane 0's connect, then add lanes if the path is long
                sock = await timed_connect()
                await _connect_lanes(ip, port, lanes_for(_connect_times[ip]) - 1, extra)
    except BaseException:
        for lane in extra:
            with contextlib.suppress(*SOCKET_ERRORS):
                await lane.aclose()
        raise
    return await dialer_handshake(sock, ticket, secret, timeout, extra)


def is_long_path(addrs: Sequence[str]) -> bool:
    """Did every connect to the TCP address among `addrs` take LANE_RTT or more (a WAN)? False if
    unknown, and for loopback."""
    rtt = _connect_times.get(tcp_ip_of(addrs) or "")
    return rtt is not None and rtt >= LANE_RTT


async def _connect_lanes(ip: str, port: int, count: int, into: list[trio.SocketStream]) -> None:
    async def one() -> None:
        into.append(await trio.open_tcp_stream(ip, port))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def open_data_stream(host: Any, peer_id: Any, addrs: Sequence[str], protocol: str, *, direct: bool = True,
                           open_timeout: float = CONNECT_TIMEOUT) -> Any:
    """An unframed byte stream to `protocol` on the peer: a direct channel when it offers one and
    its TCP address is reachable, else a libp2p stream (the libp2p connection must exist). Frame it
    with `framed_data_stream`, which also releases it."""
    ip = tcp_ip_of(addrs) if direct else None
    if ip is not None:
        try:
            return await open_direct_channel(host, peer_id, ip, protocol, open_timeout)
        except (trio.TooSlowError, OSError, DirectChannelError, *STREAM_ERRORS) as exc:
            if isinstance(exc, StreamOpenTimeout):
                raise  # the peer does not answer at all: a libp2p stream would not open either
            logger.info("direct channel to %s unavailable (%s); using a libp2p stream", peer_id, exc)
    elif direct and any("/p2p-circuit" in str(a) for a in addrs):
        from molink.dht.holepunch import try_punched_channel  # builds on this module

        channel = await try_punched_channel(host, peer_id, protocol, open_timeout)
        if channel is not None:
            return channel
    return await open_raw_stream(host, peer_id, protocol, open_timeout=open_timeout)


async def release_data_stream(stream: Any) -> None:
    """For a stream from open_data_stream that will never be framed (error paths)."""
    if isinstance(stream, DirectChannel):
        await stream.reset()
        return
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception:
            logger.debug("resetting an unused stream failed", exc_info=True)


@asynccontextmanager
async def framed_data_stream(stream: Any, **options: Any) -> AsyncIterator[FramedStream]:
    try:
        async with open_framed_stream(stream, **options) as framed:
            yield framed
    finally:
        if isinstance(stream, DirectChannel):
            await stream.aclose_socket()


@asynccontextmanager
async def dial_framed_direct(host: Any, peer_id: Any, addrs: Sequence[str], protocol: str, *, direct: bool = True,
                             open_timeout: float = CONNECT_TIMEOUT, **options: Any) -> AsyncIterator[FramedStream]:
    """open_data_stream + framed_data_stream in one."""
    stream = await open_data_stream(host, peer_id, addrs, protocol, direct=direct, open_timeout=open_timeout)
    async with framed_data_stream(stream, **options) as framed:
        yield framed
