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

A DirectChannel speaks the small part of libp2p's INetStream that FramedStream uses (read,
write, close, reset), so every protocol handler serves both transports unchanged. When anything
about the direct path fails (the peer does not offer it, the port is unreachable behind a NAT)
`dial_framed_direct` falls back to a libp2p stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import multiaddr
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
MAGIC = b"MLDIRCT1"
TICKET_BYTES = 16
SECRET_BYTES = 32
TAG_BYTES = 16
RECORD_HEADER = struct.Struct(">I")
MAX_RECORD_PLAINTEXT = 1 << 20  # larger writes are split; a longer header is refused before reading
HELLO, WELCOME = b"molink-direct hello", b"molink-direct welcome"
TICKET_TTL = 10.0
MAX_TICKETS = 1024
MAX_TICKETS_PER_PEER = 64
HANDSHAKE_TIMEOUT = 3.0  # from TCP accept to a verified hello: slowloris sockets are dropped
MAX_HANDSHAKING = 64
CONNECT_TIMEOUT = 3.0
SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
DRAIN_ON_CLOSE = 0.05  # read the peer's goodbye before closing, so the close is a FIN, not an RST


class DirectChannelError(Exception):
    """The direct channel failed: bad record, failed authentication, or a dead socket."""


def _channel_keys(secret: bytes, ticket: bytes) -> tuple[bytes, bytes]:
    """(dialer -> listener key, listener -> dialer key)."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=ticket, info=b"molink-direct/v1").derive(secret)
    return okm[:32], okm[32:]


class DirectChannel:
    """An encrypted, authenticated byte stream over one TCP socket (INetStream-like)."""

    def __init__(self, sock: trio.SocketStream, send_key: bytes, receive_key: bytes):
        self.socket = sock
        self._send_aead, self._receive_aead = ChaCha20Poly1305(send_key), ChaCha20Poly1305(receive_key)
        self._send_counter = self._receive_counter = 0
        self._raw = bytearray()  # ciphertext bytes read past the current record
        self._plain = bytearray()  # decrypted bytes not yet handed to read()
        self._eof = False
        self.is_closed = False
        self.muxed_conn = None  # FramedStream asks; there is no connection beneath to drop
        self.remote_peer: str | None = None  # listener side: the peer id its ticket was issued to

    # ---------------------------------------------------------------- records

    def seal(self, plaintext: bytes) -> bytes:
        if len(plaintext) <= MAX_RECORD_PLAINTEXT:  # the hot path: one record, no copies
            return self._seal_one(plaintext)
        view = memoryview(plaintext)
        return b"".join(self._seal_one(view[offset:offset + MAX_RECORD_PLAINTEXT])
                        for offset in range(0, len(plaintext), MAX_RECORD_PLAINTEXT))

    def _seal_one(self, piece) -> bytes:
        nonce = self._send_counter.to_bytes(12, "little")
        self._send_counter += 1
        sealed = self._send_aead.encrypt(nonce, bytes(piece), None)
        return RECORD_HEADER.pack(len(sealed)) + sealed

    async def _receive_raw(self, n: int) -> bool:
        """Fill self._raw to n bytes; False on EOF before that."""
        while len(self._raw) < n:
            chunk = await self.socket.receive_some(max(n - len(self._raw), 65536))
            if not chunk:
                return False
            self._raw += chunk
        return True

    async def read_record(self) -> bytes | None:
        """The next record's plaintext; None at a clean EOF between records."""
        if not await self._receive_raw(RECORD_HEADER.size):
            if self._raw:
                raise DirectChannelError("EOF inside a record header")
            return None
        (length,) = RECORD_HEADER.unpack_from(self._raw)
        if not TAG_BYTES <= length <= MAX_RECORD_PLAINTEXT + TAG_BYTES:
            raise DirectChannelError(f"record of {length} bytes refused")
        total = RECORD_HEADER.size + length
        if not await self._receive_raw(total):
            raise DirectChannelError("EOF inside a record")
        sealed = bytes(self._raw[RECORD_HEADER.size:total])
        del self._raw[:total]
        nonce = self._receive_counter.to_bytes(12, "little")
        self._receive_counter += 1
        try:
            return self._receive_aead.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise DirectChannelError("record failed authentication (forged, replayed or reordered)") from None

    # ---------------------------------------------------------------- INetStream subset

    async def read(self, n: int | None = None) -> bytes:
        while not self._plain:
            if self._eof:
                return b""
            try:
                record = await self.read_record()
            except (trio.BrokenResourceError, OSError) as exc:
                raise DirectChannelError(f"connection reset: {exc}") from exc
            if record is None:
                self._eof = True
                return b""
            self._plain += record
        n = len(self._plain) if n is None else n
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    async def write(self, data: bytes) -> None:
        try:
            await self.socket.send_all(self.seal(data))
        except SOCKET_ERRORS as exc:
            raise DirectChannelError(f"send failed: {exc}") from exc

    async def close(self) -> None:
        """Half-close (our FIN); reading goes on until the peer closes too."""
        try:
            await self.socket.send_eof()
        except SOCKET_ERRORS:
            pass

    async def reset(self) -> None:
        """Abort with a TCP RST."""
        if self.is_closed:
            return
        with contextlib.suppress(*SOCKET_ERRORS):
            self.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.aclose_socket(drain=False)

    async def aclose_socket(self, drain: bool = True) -> None:
        """Release the socket (the owner calls this when the framed stream is done)."""
        if self.is_closed:
            return
        self.is_closed = True
        with trio.CancelScope(shield=True):
            if drain and not self._eof:
                with trio.move_on_after(DRAIN_ON_CLOSE), contextlib.suppress(*SOCKET_ERRORS):
                    while await self.socket.receive_some(65536):
                        pass
            with contextlib.suppress(*SOCKET_ERRORS):
                await self.socket.aclose()


# -------------------------------------------------------------------- the serving side


@dataclass
class _Ticket:
    secret: bytes
    protocol: str
    peer: str
    expires: float


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
        channel, protocol = None, None
        async with self._handshaking:
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                try:
                    channel, protocol = await self._handshake(sock)
                except (DirectChannelError, trio.BrokenResourceError, OSError) as exc:
                    logger.debug("direct handshake refused: %s", exc)
        if channel is None:
            with contextlib.suppress(*SOCKET_ERRORS):
                await sock.aclose()
            return
        try:
            await self.handlers[protocol](channel)
        finally:
            await channel.aclose_socket()

    async def _handshake(self, sock: trio.SocketStream) -> tuple[DirectChannel, str] | tuple[None, None]:
        opening = bytearray()
        while len(opening) < len(MAGIC) + TICKET_BYTES:
            chunk = await sock.receive_some(len(MAGIC) + TICKET_BYTES - len(opening))
            if not chunk:
                return None, None
            opening += chunk
        if bytes(opening[:len(MAGIC)]) != MAGIC:
            raise DirectChannelError("not a MoLink direct channel")
        ticket = bytes(opening[len(MAGIC):])
        entry = self._tickets.get(ticket)
        if entry is None or entry.expires < trio.current_time():
            raise DirectChannelError("unknown or expired ticket")
        to_listener, to_dialer = _channel_keys(entry.secret, ticket)
        channel = DirectChannel(sock, send_key=to_dialer, receive_key=to_listener)
        if await channel.read_record() != HELLO:  # proves the dialer holds the secret
            raise DirectChannelError("bad hello")
        del self._tickets[ticket]  # single use, spent only by someone who proved the secret
        channel.remote_peer = entry.peer if entry.peer != "?" else None  # per-client caps (peer/session_limits.py)
        await channel.write(WELCOME)
        return channel, entry.protocol


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


async def open_direct_channel(host: Any, peer_id: Any, ip: str, protocol: str,
                              timeout: float = CONNECT_TIMEOUT) -> DirectChannel:
    port, ticket, secret = await _request_ticket(host, peer_id, protocol, timeout)
    with trio.fail_after(timeout):
        sock = await trio.open_tcp_stream(ip, port)
    return await dialer_handshake(sock, ticket, secret, timeout)


async def dialer_handshake(sock: trio.SocketStream, ticket: bytes, secret: bytes,
                           timeout: float = CONNECT_TIMEOUT) -> DirectChannel:
    """Present the ticket and prove the secret on a connected socket (also used by holepunch.py)."""
    to_listener, to_dialer = _channel_keys(secret, ticket)
    channel = DirectChannel(sock, send_key=to_listener, receive_key=to_dialer)
    try:
        with trio.fail_after(timeout):
            await sock.send_all(MAGIC + ticket + channel.seal(HELLO))
            if await channel.read_record() != WELCOME:
                raise DirectChannelError("no welcome")
    except BaseException:
        await channel.reset()
        raise
    return channel


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
