"""Hole punching for direct data channels: TCP simultaneous open through two NATs.

When the serving peer is reachable only through a relay, the dialer asks it for a direct-channel
ticket over the relayed libp2p connection as usual, and adds `punch_port`: a local port it has
bound with SO_REUSEADDR + SO_REUSEPORT. The serving peer binds a port of its own the same way,
starts connecting from it to the dialer's public IP and port, and answers with the ticket and its
port; the dialer then connects from its port to the peer's. Each outgoing SYN opens its own NAT's
mapping and filter for exactly that remote endpoint, so the other side's SYN is let in and TCP's
simultaneous open joins the two attempts into one connection (DESIGN.md §6 measured 3/3 between
two port-preserving "cone" NATs, 0/3 with a symmetric NAT on either side: the port we aim at is
then not the one the NAT picked, and we stay relayed). On the joined socket the usual direct
channel handshake runs (ticket, AEAD hello), so punching adds no trust: a stranger answering the
SYN cannot present the ticket or the secret.

Where to aim: the public IP the RELAY saw the other end connect from (relay.peer_ips), never an
address the other end claims; the port is the one it bound (port-preserving NATs keep it).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any

import trio

from molink.dht.direct import (
    DIRECT_PROTOCOL,
    ERROR,
    SECRET_BYTES,
    TICKET,
    TICKET_BYTES,
    DirectChannel,
    DirectChannelError,
    DirectListener,
    dialer_handshake,
)
from molink.dht.relay import peer_ips
from molink.dht.streams import STREAM_ERRORS, FramedStream, StreamOpenTimeout, dial_framed
from molink.dht.wire import Frame

logger = logging.getLogger(__name__)

PUNCH_ENV = "MOLINK_HOLEPUNCH"  # "0" turns punching off (benchmarks: relayed vs punched)
PUNCH_TIMEOUT = 3.0  # covers the kernel's first SYN retransmission (1 s)
RETRY_DELAY = 0.05  # after an RST (a NAT or host that refuses instead of dropping)
FAILURE_MEMORY = 300.0  # after a failed punch, go relayed to that peer for this long
MAX_PUNCHES = 16  # concurrent punches a serving peer runs (each is a bound port and SYNs to one IP)


def punching_enabled() -> bool:
    return os.environ.get(PUNCH_ENV, "1") != "0"


def _punch_socket(port: int = 0) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every socket sharing the port needs it
    return sock


async def bind_punch_port() -> tuple[trio.socket.SocketType, int]:
    """A socket bound to a fresh port; keep it open until the punch is over (it holds the port)."""
    sock = _punch_socket()
    await sock.bind(("0.0.0.0", 0))
    return sock, sock.getsockname()[1]


async def simultaneous_connect(local_port: int, ip: str, port: int, timeout: float = PUNCH_TIMEOUT) -> trio.SocketStream:
    """Connect from local_port to ip:port, retrying on refusals until `timeout`."""
    deadline = trio.current_time() + timeout
    last: Exception | None = None
    while trio.current_time() < deadline:
        sock = _punch_socket()
        try:
            await sock.bind(("0.0.0.0", local_port))
            with trio.move_on_at(deadline):
                await sock.connect((ip, port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return trio.SocketStream(sock)
            last = TimeoutError(f"no answer from {ip}:{port} within {timeout} s")
        except OSError as exc:
            last = exc
            if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                sock.close()
                break
        sock.close()
        await trio.sleep(RETRY_DELAY)
    raise DirectChannelError(f"hole punch to {ip}:{port} failed: {last}")


# -------------------------------------------------------------------- serving side


class PunchingDirectListener(DirectListener):
    """A DirectListener that also punches towards dialers that ask for it (see the module doc)."""

    def __init__(self, *args: Any, host: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.host = host
        self._nursery: trio.Nursery | None = None
        self._punching = trio.CapacityLimiter(MAX_PUNCHES)
        self.punched = self.punch_failures = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(super().run)
            task_status.started(self.port)

    async def handle_ticket_request(self, framed: FramedStream) -> None:
        try:
            request = await framed.receive(timeout=PUNCH_TIMEOUT)
            body = request.body
            protocol, punch_port = body.get("protocol"), body.get("punch_port")
            peer = str(getattr(getattr(framed.stream, "muxed_conn", None), "peer_id", "?"))
            reply: dict[str, Any] = {}
            try:
                if request.type != TICKET or not isinstance(protocol, str):
                    raise ValueError("expected a ticket request naming a protocol")
                if punch_port is not None:
                    target_ip = peer_ips(self.host).get(peer) if self.host is not None else None
                    if type(punch_port) is not int or not 1024 <= punch_port < 65536:
                        raise ValueError("bad punch port")
                    if target_ip is None or self._nursery is None:
                        raise ValueError("no relay told us your public address: cannot punch")
                    if self._punching.borrowed_tokens >= MAX_PUNCHES:
                        raise ValueError("too many hole punches in progress")
                ticket, secret = self.issue(protocol, peer)
                if punch_port is not None:
                    sock, my_port = await bind_punch_port()
                    self._nursery.start_soon(self._punch, sock, my_port, target_ip, punch_port, peer)
                    reply["punch_port"] = my_port
            except ValueError as exc:
                await framed.send(Frame(ERROR, request.request_id, {"message": str(exc)}))
                return
            await framed.send(Frame(TICKET, request.request_id, {"port": self.port, "ticket": ticket,
                                                                 "secret": secret, **reply}))
        except STREAM_ERRORS:
            return

    async def _punch(self, holder: Any, my_port: int, ip: str, port: int, peer: str) -> None:
        """Connect towards the dialer and, on the same port, accept its SYN: through NATs the
        simultaneous open joins the two attempts; where a host answers SYNs to a closed port with
        RST (no NAT, or loopback) one side's plain connect reaches the other's listen."""
        sock = None
        async with self._punching:
            try:
                holder.listen(1)
                with trio.move_on_after(PUNCH_TIMEOUT):
                    async with trio.open_nursery() as nursery:
                        async def connect() -> None:
                            nonlocal sock
                            try:
                                sock = await simultaneous_connect(my_port, ip, port)
                                nursery.cancel_scope.cancel()
                            except DirectChannelError:
                                pass

                        async def accept() -> None:
                            nonlocal sock
                            while sock is None:
                                conn, (their_ip, _) = await holder.accept()
                                if their_ip == ip:  # only the dialer's address may take the punch
                                    sock = trio.SocketStream(conn)
                                    nursery.cancel_scope.cancel()
                                else:
                                    conn.close()

                        nursery.start_soon(connect)
                        nursery.start_soon(accept)
            finally:
                holder.close()
        if sock is None:
            self.punch_failures += 1
            logger.info("hole punch towards %s (%s:%d) failed", peer, ip, port)
            return
        self.punched += 1
        logger.info("hole punched: direct channel from %s (%s:%d)", peer, ip, port)
        await self._serve_connection(sock)


# -------------------------------------------------------------------- dialing side


_failed: dict[tuple[int, str], float] = {}  # (host, peer) -> when punching it last failed


def data_paths(host: Any) -> dict[str, str]:
    """Per host: peer id -> how our last data channel to it went through a relay: "punched" (direct
    after all) or "relayed". Routing charges the relay penalty only for the second."""
    table = getattr(host, "_molink_data_paths", None)
    if table is None:
        table = {}
        host._molink_data_paths = table
    return table


async def open_punched_channel(host: Any, peer_id: Any, protocol: str, timeout: float = PUNCH_TIMEOUT) -> DirectChannel:
    """A direct channel to a peer we reach through a relay, by simultaneous open."""
    peer = peer_id.to_base58() if hasattr(peer_id, "to_base58") else str(peer_id)
    key = (id(host), peer)
    if time.monotonic() - _failed.get(key, -FAILURE_MEMORY) < FAILURE_MEMORY:
        raise DirectChannelError("hole punching to this peer failed recently")
    ip = peer_ips(host).get(peer)
    if ip is None:
        data_paths(host)[peer] = "relayed"
        raise DirectChannelError("no relay told us the peer's public address")
    holder, my_port = await bind_punch_port()
    try:
        async with dial_framed(host, peer_id, DIRECT_PROTOCOL, open_timeout=timeout) as framed:
            reply = await framed.request(Frame(TICKET, 1, {"protocol": protocol, "punch_port": my_port}),
                                         timeout=timeout)
        body = reply.body
        their_port, ticket, secret = body.get("punch_port"), body.get("ticket"), body.get("secret")
        if reply.type != TICKET:
            raise DirectChannelError(f"no ticket: {body.get('message')!r}")
        if not (type(their_port) is int and 0 < their_port < 65536 and isinstance(ticket, bytes)
                and len(ticket) == TICKET_BYTES and isinstance(secret, bytes) and len(secret) == SECRET_BYTES):
            raise DirectChannelError("malformed punch ticket")
        sock = await simultaneous_connect(my_port, ip, their_port, timeout)
    except BaseException as exc:
        if isinstance(exc, DirectChannelError):
            _failed[key] = time.monotonic()
            if len(_failed) > 4096:  # bounded: the oldest failure is forgotten first
                del _failed[next(iter(_failed))]
            data_paths(host)[peer] = "relayed"
        raise
    finally:
        holder.close()
    channel = await dialer_handshake(sock, ticket, secret, timeout)
    channel.punched = True
    _failed.pop(key, None)
    data_paths(host)[peer] = "punched"
    return channel


async def try_punched_channel(host: Any, peer_id: Any, protocol: str, timeout: float = PUNCH_TIMEOUT) -> DirectChannel | None:
    """For direct.open_data_stream: a punched channel to a relayed peer, or None (stay relayed)."""
    if not punching_enabled():
        logger.info("data channel to %s: relayed (hole punching off)", peer_id)
        return None
    try:
        channel = await open_punched_channel(host, peer_id, protocol, timeout)
    except (trio.TooSlowError, OSError, DirectChannelError, *STREAM_ERRORS) as exc:
        if isinstance(exc, StreamOpenTimeout):
            raise  # the peer does not answer at all: a relayed stream would not open either
        logger.info("data channel to %s: relayed (hole punch failed: %s)", peer_id, exc)
        return None
    logger.info("data channel to %s: hole punched (direct)", peer_id)
    return channel


def transport_kind(stream: Any) -> str:
    """How a data stream from direct.open_data_stream travels: punched, direct, relayed or libp2p."""
    if isinstance(stream, DirectChannel):
        return "punched" if getattr(stream, "punched", False) else "direct"
    conn = getattr(stream, "muxed_conn", None)
    return "relayed" if getattr(conn, "molink_relayed", False) else "libp2p"
