"""Small control messages on a raw libp2p stream, read without reading past them.

The relay and dial-back protocols exchange one or two small frames and then (the relay) hand the
very same stream on as a byte pipe or as the carrier of a whole libp2p connection. FramedStream
cannot be used there: its reader task reads ahead into its own buffer and would swallow the first
bytes of what follows. These helpers read exactly one frame (length prefix, then payload) with a
deadline, under tight limits, so a hostile peer can make us allocate only a few KB.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import trio

from molink.dht.wire import (
    LENGTH_PREFIX_BYTES,
    Frame,
    WireError,
    WireLimits,
    decode_frame_payload,
    encode_frame,
    parse_frame_length,
)

CONTROL_LIMITS = WireLimits(max_frame_bytes=4096, max_tensor_bytes=0, max_str_len=512, max_array_len=16,
                            max_map_len=16)
CONTROL_TIMEOUT = 10.0


class ControlError(Exception):
    """A control exchange failed: timeout, EOF, malformed or unexpected message."""


async def _read_exact(stream: Any, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        try:
            chunk = await stream.read(n - len(data))  # never more than asked: nothing read past the frame
        except EOFError:
            chunk = b""
        except Exception as exc:  # libp2p stream errors are many types
            raise ControlError(f"read failed: {exc!r}") from exc
        if not chunk:
            raise ControlError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def read_control(stream: Any, timeout: float = CONTROL_TIMEOUT) -> Frame:
    try:
        with trio.fail_after(timeout):
            length = parse_frame_length(await _read_exact(stream, LENGTH_PREFIX_BYTES), CONTROL_LIMITS)
            return decode_frame_payload(await _read_exact(stream, length), CONTROL_LIMITS)
    except trio.TooSlowError:
        raise ControlError(f"no control message within {timeout} s") from None
    except WireError as exc:
        raise ControlError(f"malformed control message: {exc}") from exc


async def write_control(stream: Any, frame_type: str, body: dict, timeout: float = CONTROL_TIMEOUT) -> None:
    data = encode_frame(Frame(frame_type, 0, body), CONTROL_LIMITS)
    try:
        with trio.fail_after(timeout):
            await stream.write(data)
    except trio.TooSlowError:
        raise ControlError(f"control message not written within {timeout} s") from None
    except Exception as exc:
        raise ControlError(f"write failed: {exc!r}") from exc


def remote_ip(stream: Any) -> str | None:
    """The IP the stream's connection comes from (what the remote's NAT shows us), if it has one."""
    conn = getattr(stream, "muxed_conn", None)
    for source in (stream, conn):
        getter = getattr(source, "get_remote_address", None)
        if getter is None:
            continue
        try:
            address = getter()
        except Exception:
            continue
        if address:
            return checked_ip(address[0])
    return None


def checked_ip(value: Any) -> str | None:
    """A canonical IP string, or None for anything that is not one."""
    if not isinstance(value, str) or len(value) > 45:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def is_relayed_stream(stream: Any) -> bool:
    """Whether the stream runs over a relayed connection (its remote address is then the relay's).
    dht/relay.py marks every connection it builds; the address check catches any other circuit."""
    conn = getattr(stream, "muxed_conn", None)
    if getattr(conn, "molink_relayed", False):
        return True
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False
