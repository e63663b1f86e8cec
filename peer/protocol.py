"""The inference protocol between clients and peers: ids, frame types, and checked request bodies.

One place for every protocol constant. Streams (see molink.dht.streams) carry frames:

client -> peer, on INFERENCE_PROTOCOL (one long-lived stream per session per hop)
  open   {session_id, model_key, start, end, batch_size, max_length, next, tap, compression}  -> opened | error
         next = {peer_id, addrs, session_id} of the following hop, or None for the last hop
         tap = the client audits this session (swarm/spot_check.py): see `tap` below
         compression = how this peer encodes the hidden states it sends: auto | raw | zstd | q8
         (molink.dht.codec_policy; "auto" when absent)
  step   {step, hidden, mask, relay}  -> result (last hop, or relay=True) | pushed on to next
  tap    {step, hidden, in_digest}     a tapped session's non-last hop also sends the client its
         output; every hop of a tapped session adds `in_digest` (tensor_digest of the input it
         got) to its tap or result, so the client can tell whether a hop pushed what it tapped
  close  {}                            -> closed
  steps  {items: [{session_id, step, hidden, mask}, ...]}   decode steps of several sessions of
         this client, on the stream of one of them (peer/step_bundles.py): each item is served
         like a `step` of its session
peer -> next peer, on PUSH_PROTOCOL (one stream per session per hop)
  push   {session_id, step, hidden, mask}   (no reply: errors go to the client's stream)
  pushes {items: [push body, ...]}          several sessions' pushed steps in one frame
peer -> client: `results {items: [{session_id, step, hidden}, ...]}` on the stream of one of the
  client's sessions: the last hop's answers to bundled steps (session_id: the last hop's)
A bundle (steps, pushes, results) may carry its items' tensors stacked: `stacked {hidden[, mask]}`,
  one [rows, new, hidden] tensor (and its [rows, new] mask) for every item that says `rows` instead
  of carrying its own `hidden`/`mask`, in item order (unstack_bundle); items with tensors of their own
  (a tapped session's) may sit beside them.
anyone -> peer, on INFO_PROTOCOL
  info   {}  -> info {peer_id, model_key, start, end, throughput, sessions, free_cache_tokens, version}
Errors are `error {code, message, step[, limit]}`; codes below (`limit`: peer/session_limits.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from molink.dht.codec_policy import COMPRESSION_MODES, DEFAULT_COMPRESSION
from molink.dht.wire import Frame, WireError, WireLimits, decode_tensor

INFERENCE_PROTOCOL = "/molink/inference/1.0.0"
PUSH_PROTOCOL = "/molink/push/1.0.0"
INFO_PROTOCOL = "/molink/info/1.0.0"

OPEN, OPENED, STEP, RESULT, CLOSE, CLOSED, PUSH, INFO, ERROR, TAP = (
    "open", "opened", "step", "result", "close", "closed", "push", "info", "error", "tap")
STEPS, PUSHES, RESULTS = "steps", "pushes", "results"  # bundles of the above (peer/step_bundles.py)
MAX_BUNDLE_ITEMS = 256  # steps in one bundle frame

# error codes
BAD_REQUEST = "bad_request"  # malformed or out-of-range input: the sender's fault
BUSY = "busy"  # no room for the session's cache now: try another replica
WRONG_MODEL = "wrong_model"  # the peer serves other weights or other blocks
NEXT_HOP_UNREACHABLE = "next_hop_unreachable"
INTERNAL = "internal"  # the peer failed computing: not the sender's fault
SESSION_EXPIRED = "session_expired"

SESSION_ID_BYTES = 16
MAX_BATCH = 64
MAX_SESSION_TOKENS = 1 << 20
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# hidden states of one chunk travel in one frame: room for a 4096-token prefill at 8192 wide in fp32
PEER_WIRE_LIMITS = WireLimits(max_frame_bytes=160 * 1024 * 1024, max_tensor_bytes=144 * 1024 * 1024)


class ProtocolError(Exception):
    """A request that is well-formed on the wire but wrong for this protocol."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def error_frame(request_id: int, code: str, message: str, step: int | None = None,
                limit: str | None = None) -> Frame:
    """`limit` names the cap a refusal hit (peer/session_limits.py); absent for other errors."""
    body = {"code": code, "message": message[:500], "step": step}
    if limit is not None:
        body["limit"] = limit
    return Frame(ERROR, request_id, body)


def _field(body: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be {getattr(kind, '__name__', kind)}")
    return value


def _int_in(body: dict, name: str, low: int, high: int) -> int:
    value = _field(body, name, int)
    if not low <= value <= high:
        raise ProtocolError(BAD_REQUEST, f"field {name!r}={value} outside [{low}, {high}]")
    return value


def bundle_items(body: dict) -> list[dict]:
    """The items of a steps/pushes/results frame: a list of at most MAX_BUNDLE_ITEMS maps."""
    items = body.get("items")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_BUNDLE_ITEMS \
            or not all(isinstance(item, dict) for item in items):
        raise ProtocolError(BAD_REQUEST, f"items must be a list of 1..{MAX_BUNDLE_ITEMS} maps")
    return items


def unstack_bundle(body: dict, limits: WireLimits, hidden_size: int) -> list[dict]:
    """The items of a bundle, each with its own `hidden` (and `mask`, when the bundle has masks):
    an item that names `rows` gets the next that many rows of the bundle's stacked tensors, as
    torch tensors (decoded once for the whole bundle; decode_step_tensors and the client's reader
    check each item's rows like any step's). A stack that does not add up fails the whole bundle:
    a sender that miscounts its own frame cannot be trusted with any item of it."""
    items = bundle_items(body)
    stacked = body.get("stacked")
    if stacked is None:
        if any("rows" in item for item in items):
            raise ProtocolError(BAD_REQUEST, "items name rows of a stack the bundle does not carry")
        return items
    if not isinstance(stacked, dict) or not set(stacked) <= {"hidden", "mask"} or "hidden" not in stacked:
        raise ProtocolError(BAD_REQUEST, "stacked must be a map with hidden (and mask)")
    rows = []
    for item in items:
        if "rows" not in item:
            continue
        if "hidden" in item or "mask" in item:
            raise ProtocolError(BAD_REQUEST, "a stacked item carries no tensors of its own")
        count = item["rows"]
        if type(count) is not int or not 1 <= count <= MAX_BATCH:
            raise ProtocolError(BAD_REQUEST, f"rows must be an integer in [1, {MAX_BATCH}]")
        rows.append(count)
    try:
        hidden = decode_tensor(stacked["hidden"], limits)
        mask = decode_tensor(stacked["mask"], limits) if "mask" in stacked else None
    except WireError as exc:
        raise ProtocolError(BAD_REQUEST, f"bad stacked tensor: {exc}") from exc
    if hidden.dtype not in FLOAT_DTYPES or hidden.dim() != 3 or hidden.shape[2] != hidden_size \
            or hidden.shape[0] != sum(rows) or not rows:
        raise ProtocolError(BAD_REQUEST, f"stacked hidden states must be float [{sum(rows)}, n, {hidden_size}], "
                                         f"got {hidden.dtype} {list(hidden.shape)}")
    if mask is not None and list(mask.shape) != list(hidden.shape[:2]):
        raise ProtocolError(BAD_REQUEST, f"stacked mask must be {list(hidden.shape[:2])}, got {list(mask.shape)}")
    hiddens = iter(hidden.split(rows))
    masks = iter(mask.split(rows)) if mask is not None else None
    unstacked = []
    for item in items:
        if "rows" in item:
            item = {**item, "hidden": next(hiddens)}
            if masks is not None:
                item["mask"] = next(masks)
        unstacked.append(item)
    return unstacked


def checked_session_id(value: Any, name: str = "session_id") -> bytes:
    if not isinstance(value, bytes) or len(value) != SESSION_ID_BYTES:
        raise ProtocolError(BAD_REQUEST, f"{name} must be {SESSION_ID_BYTES} bytes")
    return value


@dataclass(frozen=True)
class NextHop:
    peer_id: str
    addrs: list[str]
    session_id: bytes

    def to_body(self) -> dict:
        return {"peer_id": self.peer_id, "addrs": self.addrs, "session_id": self.session_id}


@dataclass(frozen=True)
class OpenRequest:
    session_id: bytes
    model_key: str
    start: int
    end: int
    batch_size: int
    max_length: int
    next: NextHop | None
    tap: bool = False
    compression: str = DEFAULT_COMPRESSION

    def to_body(self) -> dict:
        return {"session_id": self.session_id, "model_key": self.model_key, "start": self.start, "end": self.end,
                "batch_size": self.batch_size, "max_length": self.max_length,
                "next": None if self.next is None else self.next.to_body(), "tap": self.tap,
                "compression": self.compression}

    @classmethod
    def from_body(cls, body: dict, num_blocks: int) -> "OpenRequest":
        start = _int_in(body, "start", 0, num_blocks - 1)
        end = _int_in(body, "end", start + 1, num_blocks)
        nxt = body.get("next")
        next_hop = None
        if nxt is not None:
            if not isinstance(nxt, dict):
                raise ProtocolError(BAD_REQUEST, "next must be a map or nil")
            addrs = _field(nxt, "addrs", list)
            if not 1 <= len(addrs) <= 16 or not all(isinstance(a, str) and len(a) < 512 for a in addrs):
                raise ProtocolError(BAD_REQUEST, "next.addrs must be 1..16 multiaddr strings")
            peer_id = _field(nxt, "peer_id", str)
            if len(peer_id) > 128:
                raise ProtocolError(BAD_REQUEST, "next.peer_id too long")
            next_hop = NextHop(peer_id, addrs, checked_session_id(nxt.get("session_id"), "next.session_id"))
        model_key = _field(body, "model_key", str)
        if len(model_key) > 256:
            raise ProtocolError(BAD_REQUEST, "model_key too long")
        tap = body.get("tap", False)
        if not isinstance(tap, bool):
            raise ProtocolError(BAD_REQUEST, "tap must be a boolean")
        compression = body.get("compression", DEFAULT_COMPRESSION)
        if not isinstance(compression, str) or compression not in COMPRESSION_MODES:
            raise ProtocolError(BAD_REQUEST, f"unknown compression {str(compression)[:32]!r}; "
                                             f"known: {COMPRESSION_MODES}")
        return cls(
            session_id=checked_session_id(body.get("session_id")),
            model_key=model_key,
            start=start,
            end=end,
            batch_size=_int_in(body, "batch_size", 1, MAX_BATCH),
            max_length=_int_in(body, "max_length", 1, MAX_SESSION_TOKENS),
            next=next_hop,
            tap=tap,
            compression=compression,
        )


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """16 bytes naming a tensor's exact values, dtype and shape: what a hop got, as it decoded it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
    digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def decode_step_tensors(body: dict, limits: WireLimits, hidden_size: int, batch_size: int,
                        room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [batch, new, hidden] (float) and their 0/1 mask [batch, new], checked."""
    try:  # a stacked bundle's item comes decoded already (unstack_bundle): never so from the wire
        hidden, mask = body.get("hidden"), body.get("mask")
        hidden = hidden if isinstance(hidden, torch.Tensor) else decode_tensor(hidden, limits)
        mask = mask if isinstance(mask, torch.Tensor) else decode_tensor(mask, limits)
    except WireError as exc:
        raise ProtocolError(BAD_REQUEST, f"bad tensor: {exc}") from exc
    if hidden.dtype not in FLOAT_DTYPES:
        raise ProtocolError(BAD_REQUEST, f"hidden states must be float, got {hidden.dtype}")
    if hidden.dim() != 3 or hidden.shape[0] != batch_size or hidden.shape[2] != hidden_size:
        raise ProtocolError(BAD_REQUEST, f"hidden states must be [{batch_size}, n, {hidden_size}], "
                                         f"got {list(hidden.shape)}")
    new_tokens = hidden.shape[1]
    if not 1 <= new_tokens <= room:
        raise ProtocolError(BAD_REQUEST, f"{new_tokens} new tokens do not fit the session's {room} left")
    if mask.dtype not in (torch.int64, torch.int32, torch.uint8, torch.bool) or list(mask.shape) != [batch_size, new_tokens]:
        raise ProtocolError(BAD_REQUEST, f"mask must be an integer [{batch_size}, {new_tokens}] tensor")
    if not _zeros_and_ones(mask):
        raise ProtocolError(BAD_REQUEST, "mask values must be 0 or 1")
    if not _all_finite(hidden):
        raise ProtocolError(BAD_REQUEST, "hidden states hold NaN or inf")
    return hidden, mask.long()


# Below this many elements a check runs in Python / numpy: a torch op costs ~3-5 us to dispatch,
# and a decode step's tensors are tiny (every peer checks every step of every session).
SMALL_CHECK = 4096


def _zeros_and_ones(mask: torch.Tensor) -> bool:
    if mask.numel() <= SMALL_CHECK:
        return set(mask.reshape(-1).tolist()) <= {0, 1}
    return not bool(((mask != 0) & (mask != 1)).any())


def _all_finite(hidden: torch.Tensor) -> bool:
    if hidden.dtype is not torch.bfloat16:  # numpy has no bfloat16
        return bool(np.isfinite(hidden.numpy()).all())
    return bool(torch.isfinite(hidden).all())
