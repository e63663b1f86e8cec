"""Private swarms: every TCP connection proves and uses the swarm key before Noise starts.

With `--swarm-key FILE` a host's TCP transport runs this exchange on each new connection, dialed
or accepted, before a single libp2p byte (multistream, Noise, yamux) flows:

    each side sends   nonce (24 random bytes) || ChaCha20_k(KEY_CHECK)     k = HKDF(swarm key, salt=nonce)
    each side checks  the other's KEY_CHECK decrypts right, and that the nonce is not its own

and from then on every byte in each direction is XORed with that direction's ChaCha20 keystream
(the key is fresh per connection and direction, so a keystream is never reused). This is the
design of libp2p's private networks ("pnet"): the pre-shared key is an admission ticket and an
outer layer, while Noise inside still authenticates the peer ids and protects the content. A
node without the key can neither join (its connection dies at the check, before any protocol
handler, the DHT included, sees it) nor read (it can open nothing to read from): not the DHT
records, not INFO, not sessions, not the direct-channel tickets handed out over libp2p streams.

Why our own layer rather than py-libp2p 0.8.1's `psk=` swarm option: that one has no key check
(a mismatch shows up later as an opaque multistream failure, or as a hang until a timeout when
the dialer has no key), reads its nonce with one `read(8)` that a split TCP segment breaks,
and uses Salsa20 with 8-byte random nonces under one long-lived key. Wrapping the transport (a
public interface: `dial`, `dial_with_source`, `create_listener`) covers dialed, accepted and
hole-punched connections alike and gives clear errors (`SwarmKeyMismatch`).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from libp2p.io.abc import ReadWriteCloser
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectCommunicatorError
from libp2p.transport.exceptions import OpenConnectionError, SecurityUpgradeFailure
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

from molink.crypto.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

NONCE_BYTES = 24
KEY_CHECK = b"molink-swarm/v1\0"  # 16 bytes: a wrong key decrypts it to noise (2^-128 to pass)
OPENING_BYTES = NONCE_BYTES + len(KEY_CHECK)
# From TCP accept (or connect) to a verified opening; loopback needs ~0.1 ms, a WAN one RTT.
HANDSHAKE_TIMEOUT = 5.0
# Accepted sockets still proving the key: each costs a task and a socket, so a flood of
# half-open connections is cut off here instead of growing without bound.
MAX_PENDING_HANDSHAKES = 256
# What a libp2p node without a swarm key sends first: recognising it lets us refuse at once
# (and say why) instead of waiting for 40 bytes that never come.
MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
_HKDF_INFO = b"molink private swarm v1"


class SwarmKeyMismatch(OpenConnectionError):
    """The other side did not prove this swarm's key: another key, no key, or not MoLink."""


def _direction_cipher(key: SwarmKey, nonce: bytes) -> Cipher:
    stream_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=_HKDF_INFO).derive(key.secret)
    # ChaCha20 in `cryptography` takes a 16-byte counter||nonce; the key is single-use, so zero.
    return Cipher(algorithms.ChaCha20(stream_key, b"\0" * 16), mode=None)


class KeyedStream(ReadWriteCloser):
    """The raw TCP stream with each direction XORed by its keystream (a ReadWriteCloser, like
    the TrioTCPStream it wraps, so RawConnection and everything above it are unchanged)."""

    def __init__(self, inner: ReadWriteCloser, encrypt: Any, decrypt: Any):
        self.inner = inner
        self._encrypt, self._decrypt = encrypt, decrypt  # cipher contexts, past the key check
        # Keystream position must follow byte order: one reader and one writer at a time.
        self._read_lock = trio.Lock()
        self._write_lock = trio.Lock()

    async def read(self, n: int | None = None) -> bytes:
        async with self._read_lock:
            data = await self.inner.read(n)
            return self._decrypt.update(data) if data else data

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            await self.inner.write(self._encrypt.update(data))

    async def close(self) -> None:
        await self.inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.inner.get_remote_address()


async def _read_opening(inner: ReadWriteCloser, where: str) -> bytes:
    opening = b""
    while len(opening) < OPENING_BYTES:
        chunk = await inner.read(OPENING_BYTES - len(opening))
        if not chunk:
            raise SwarmKeyMismatch(f"{where} closed the connection during the swarm-key check "
                                   "(it uses another swarm key, or none)")
        opening += chunk
        if len(opening) >= len(MULTISTREAM_HEADER) and opening.startswith(MULTISTREAM_HEADER):
            raise SwarmKeyMismatch(f"{where} has no swarm key (it spoke plain libp2p); "
                                   "this node is in a private swarm")
    return opening


async def swarm_key_handshake(inner: ReadWriteCloser, key: SwarmKey, where: str) -> KeyedStream:
    """Prove the key, check the other side's proof, return the keyed stream (SwarmKeyMismatch if not).

    Both sides send first and then read, so there is no round trip to wait for and no way for
    two members to deadlock; the caller bounds the time.
    """
    nonce = os.urandom(NONCE_BYTES)
    encrypt = _direction_cipher(key, nonce).encryptor()
    await inner.write(nonce + encrypt.update(KEY_CHECK))
    opening = await _read_opening(inner, where)
    their_nonce = opening[:NONCE_BYTES]
    if their_nonce == nonce:  # our own opening reflected back: whoever sent it holds no key
        raise SwarmKeyMismatch(f"{where} reflected our swarm-key proof")
    decrypt = _direction_cipher(key, their_nonce).decryptor()
    if not hmac.compare_digest(decrypt.update(opening[NONCE_BYTES:]), KEY_CHECK):
        raise SwarmKeyMismatch(f"{where} does not hold this swarm's key (wrong --swarm-key?)")
    return KeyedStream(inner, encrypt, decrypt)


async def _close_quietly(closer: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await closer.close()
        except Exception:
            logger.debug("closing a refused connection failed", exc_info=True)


class PrivateSwarmTCP(TCP):
    """libp2p's TCP transport, with the swarm-key exchange on every connection it makes or accepts."""

    def __init__(self, swarm_key: SwarmKey, **options: Any):
        super().__init__(**options)
        self.swarm_key = swarm_key
        self.pending_handshakes = 0
        self.refused = 0  # accepted connections that failed the check (for logs and tests)

    async def dial(self, maddr: Multiaddr) -> RawConnection:
        return await self._keyed_dial(await super().dial(maddr), maddr)

    async def dial_with_source(self, maddr: Multiaddr, source: tuple[str, int]) -> RawConnection:
        return await self._keyed_dial(await super().dial_with_source(maddr, source), maddr)

    async def _keyed_dial(self, raw: Any, maddr: Multiaddr) -> RawConnection:
        where = f"the peer at {maddr}"
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                keyed = await swarm_key_handshake(raw.stream, self.swarm_key, where)
        except trio.TooSlowError:
            await _close_quietly(raw)
            raise SwarmKeyMismatch(f"{where} did not answer the swarm-key check within "
                                   f"{HANDSHAKE_TIMEOUT:.0f} s (not in this private swarm?)") from None
        except BaseException:
            await _close_quietly(raw)
            raise
        return RawConnection(keyed, True)

    def create_listener(self, handler_function: Callable[[ReadWriteCloser], Awaitable[None]]) -> Any:
        async def keyed_handler(stream: ReadWriteCloser) -> None:
            if self.pending_handshakes >= MAX_PENDING_HANDSHAKES:
                await _close_quietly(stream)
                return
            self.pending_handshakes += 1
            keyed = None
            try:
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    keyed = await swarm_key_handshake(stream, self.swarm_key, "an inbound peer")
            except Exception as exc:  # SwarmKeyMismatch, or the socket died: either way refused
                logger.debug("inbound connection refused: %s", exc)
            finally:
                self.pending_handshakes -= 1
            if keyed is None:
                self.refused += 1
                await _close_quietly(stream)
                return
            await handler_function(keyed)

        return super().create_listener(keyed_handler)


NEGOTIATION_NOISE = (SecurityUpgradeFailure, MultiselectClientError, MultiselectCommunicatorError, MemoryError)


def _causes(exc: BaseException | None) -> list[BaseException]:
    """An exception and its causes: libp2p wraps a dial error in SwarmException, then lists it
    in a MultiError (`errors`) behind SwarmDialAllFailedError."""
    pending, found = [exc], []
    while pending and len(found) < 64:
        current = pending.pop()
        if current is None or any(current is f for f in found):
            continue
        found.append(current)
        pending.extend([current.__cause__, current.__context__])
        pending.extend(e for e in getattr(current, "errors", None) or () if isinstance(e, BaseException))
        pending.extend(getattr(current, "exceptions", None) or ())  # exception groups
    return found


def dial_failure_reason(exc: BaseException) -> str | None:
    """What to tell a user about a failed dial when a swarm key is (or may be) the reason."""
    causes = _causes(exc)
    for cause in causes:
        if isinstance(cause, SwarmKeyMismatch):
            return str(cause)
    if any(isinstance(cause, NEGOTIATION_NOISE) for cause in causes):
        # What a node without the key sees when it dials a private swarm: the other side's
        # opening is noise to its multistream negotiation. libp2p wraps most of what that does
        # in SecurityUpgradeFailure; ~1 dial in 40 it reads a random varint as a huge length and
        # its MemoryError escapes unwrapped (measured: 39 of 40 keyless dials said the former).
        return ("the security handshake failed: if that node is in a private swarm, this one needs "
                "the same --swarm-key")
    return None
