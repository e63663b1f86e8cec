"""The direct channel itself: ChaCha20-Poly1305 records over one TCP socket or several (lanes).

Records: a 4-byte length, then the sealed plaintext; nonces are per-direction counters, so a
replayed, reordered or forged record fails authentication. Keys come from the ticket's secret
(HKDF; dht/direct.py hands tickets out over libp2p).

Lanes: on a link with a real round trip (a WAN), one fresh TCP connection can put only its initial
congestion window (10 segments, ~14 KB) on the wire in the first round trip, so a 35 KB prompt
chunk waits a whole extra round trip per hop (measured on the WAN bed: TTFT 2.8x its floor). A
channel can therefore stripe its records over several TCP connections (*lanes*) opened together
under one ticket: record n travels on lane n mod k, each lane brings its own initial window, and
the reader takes records in the same order, so the byte stream is the same as on one socket.
Lane 0's hello names k; every extra lane proves the secret with a key of its own. The dialer picks
k from its TCP connect time to that IP (`lanes_for`: one lane on loopback and LANs, WAN_LANES on
longer paths; MOLINK_DIRECT_LANES overrides).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Sequence

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"MLDIRCT1"
TICKET_BYTES = 16
SECRET_BYTES = 32
TAG_BYTES = 16
RECORD_HEADER = struct.Struct(">I")
MAX_RECORD_PLAINTEXT = 1 << 20  # larger writes are split; a longer header is refused before reading
HELLO, WELCOME = b"molink-direct hello", b"molink-direct welcome"
LANE_MAGIC = b"MLDLANE1"  # an extra lane of a ticket's channel: LANE_MAGIC + ticket + lane index + hello
MAX_LANES = 32
WAN_LANES = 16  # 16 x ~14 KB of initial window: a 1024-token prompt of a small model in one round trip
LANE_RTT = 0.005  # a TCP connect slower than this: a path where slow start costs round trips
LANE_PIECE = 4096  # with lanes, writes are cut into records this large and dealt over the lanes
SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
DRAIN_ON_CLOSE = 0.05  # read the peer's goodbye before closing, so the close is a FIN, not an RST


CONNECT_TIMEOUT = 3.0


class DirectChannelError(Exception):
    """The direct channel failed: bad record, failed authentication, or a dead socket."""


def _channel_keys(secret: bytes, ticket: bytes) -> tuple[bytes, bytes]:
    """(dialer -> listener key, listener -> dialer key)."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=ticket, info=b"molink-direct/v1").derive(secret)
    return okm[:32], okm[32:]


def _lane_hello(secret: bytes, ticket: bytes, lane: int) -> bytes:
    """What an extra lane sends after LANE_MAGIC + ticket + lane: a hello sealed with its own key."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=ticket,
               info=b"molink-direct/lane/v1/" + bytes([lane])).derive(secret)
    return ChaCha20Poly1305(key).encrypt(bytes(12), HELLO, None)


def lanes_for(rtt: float) -> int:
    """Lanes for a channel to an IP whose TCP connect took `rtt` seconds (see the module doc)."""
    setting = os.environ.get("MOLINK_DIRECT_LANES", "auto")
    if setting != "auto":
        return max(1, min(MAX_LANES, int(setting)))
    return WAN_LANES if rtt >= LANE_RTT else 1


class DirectChannel:
    """An encrypted, authenticated byte stream over one TCP socket, or several (lanes; INetStream-like)."""

    def __init__(self, sock: trio.SocketStream, send_key: bytes, receive_key: bytes):
        self.socket = sock
        self.lanes: list[trio.SocketStream] = [sock]  # record n travels on lanes[n % len(lanes)]
        self._send_aead, self._receive_aead = ChaCha20Poly1305(send_key), ChaCha20Poly1305(receive_key)
        self._send_counter = self._receive_counter = 0
        self._raws = [bytearray()]  # per lane: ciphertext bytes read past the current record
        self._plain = bytearray()  # decrypted bytes not yet handed to read()
        self._eof = False
        self.is_closed = False
        self.muxed_conn = None  # FramedStream asks; there is no connection beneath to drop
        self.remote_peer: str | None = None  # listener side: the peer id its ticket was issued to
        self.closed_event = trio.Event()  # extra lanes' accept tasks live until then (trio closes on return)

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

    def add_lanes(self, extra: list[trio.SocketStream]) -> None:
        self.lanes += extra
        self._raws += [bytearray() for _ in extra]

    async def _receive_raw(self, lane: int, n: int) -> bool:
        """Fill lane's raw buffer to n bytes; False on EOF before that."""
        raw, sock = self._raws[lane], self.lanes[lane]
        while len(raw) < n:
            chunk = await sock.receive_some(max(n - len(raw), 65536))
            if not chunk:
                return False
            raw += chunk
        return True

    async def read_record(self) -> bytes | None:
        """The next record's plaintext; None at a clean EOF between records."""
        lane = self._receive_counter % len(self.lanes)
        raw = self._raws[lane]
        if not await self._receive_raw(lane, RECORD_HEADER.size):
            if raw:
                raise DirectChannelError("EOF inside a record header")
            return None
        (length,) = RECORD_HEADER.unpack_from(raw)
        if not TAG_BYTES <= length <= MAX_RECORD_PLAINTEXT + TAG_BYTES:
            raise DirectChannelError(f"record of {length} bytes refused")
        total = RECORD_HEADER.size + length
        if not await self._receive_raw(lane, total):
            raise DirectChannelError("EOF inside a record")
        sealed = bytes(raw[RECORD_HEADER.size:total])
        del raw[:total]
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
            if len(self.lanes) == 1:
                await self.socket.send_all(self.seal(data))
                return
            # deal LANE_PIECE records over the lanes in counter order, one send per lane
            k, view = len(self.lanes), memoryview(data)
            per_lane: dict[int, list[bytes]] = {}
            for offset in range(0, max(len(data), 1), LANE_PIECE):
                lane = self._send_counter % k
                per_lane.setdefault(lane, []).append(self._seal_one(view[offset:offset + LANE_PIECE]))
            if len(per_lane) == 1:
                lane, records = per_lane.popitem()
                await self.lanes[lane].send_all(b"".join(records))
                return
            # every lane sends on its own: the reader takes records in counter order, so a lane
            # waiting for buffer space must never hold back the records the reader needs first
            async with trio.open_nursery() as nursery:
                for lane, records in per_lane.items():
                    nursery.start_soon(self.lanes[lane].send_all, b"".join(records))
        except SOCKET_ERRORS as exc:
            raise DirectChannelError(f"send failed: {exc}") from exc
        except BaseExceptionGroup as group:  # from the lanes' nursery
            failed = group.subgroup(SOCKET_ERRORS)
            if failed is None or failed.split(SOCKET_ERRORS)[1] is not None:
                raise
            raise DirectChannelError(f"send failed: {failed.exceptions[0]}") from group

    async def close(self) -> None:
        """Half-close (our FIN); reading goes on until the peer closes too."""
        for sock in self.lanes:
            try:
                await sock.send_eof()
            except SOCKET_ERRORS:
                pass

    async def reset(self) -> None:
        """Abort with a TCP RST."""
        if self.is_closed:
            return
        for sock in self.lanes:
            with contextlib.suppress(*SOCKET_ERRORS):
                sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.aclose_socket(drain=False)

    async def aclose_socket(self, drain: bool = True) -> None:
        """Release the socket(s) (the owner calls this when the framed stream is done)."""
        if self.is_closed:
            return
        self.is_closed = True
        with trio.CancelScope(shield=True):
            if drain and not self._eof:
                with trio.move_on_after(DRAIN_ON_CLOSE), contextlib.suppress(*SOCKET_ERRORS):
                    while await self.socket.receive_some(65536):
                        pass
            for sock in self.lanes:
                with contextlib.suppress(*SOCKET_ERRORS):
                    await sock.aclose()
            self.closed_event.set()


# -------------------------------------------------------------------- the serving side


async def dialer_handshake(sock: trio.SocketStream, ticket: bytes, secret: bytes,
                           timeout: float = CONNECT_TIMEOUT, extra: Sequence[trio.SocketStream] = ()) -> DirectChannel:
    """Present the ticket and prove the secret on a connected socket (also used by holepunch.py),
    and on each extra lane with its own key; the welcome comes on lane 0 once every lane is in."""
    to_listener, to_dialer = _channel_keys(secret, ticket)
    channel = DirectChannel(sock, send_key=to_listener, receive_key=to_dialer)
    lanes = 1 + len(extra)
    try:
        with trio.fail_after(timeout):
            await sock.send_all(MAGIC + ticket + channel.seal(HELLO if lanes == 1 else HELLO + bytes([lanes])))
            for index, lane in enumerate(extra, start=1):
                hello = _lane_hello(secret, ticket, index)
                await lane.send_all(LANE_MAGIC + ticket + bytes([index]) + RECORD_HEADER.pack(len(hello)) + hello)
            if await channel.read_record() != WELCOME:
                raise DirectChannelError("no welcome")
    except BaseException:
        channel.add_lanes(list(extra))
        await channel.reset()
        raise
    channel.add_lanes(list(extra))
    return channel


async def _receive_exactly(sock: trio.SocketStream, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = await sock.receive_some(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)
