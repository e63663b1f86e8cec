"""Span records: what a peer announces in the DHT, signed by the peer it names.

A record says "peer P serves blocks [start, end) of model K at these addresses until T". It travels
as msgpack {"record": {...fixed fields...}, "sig": 64 bytes}. The DHT itself vouches for nothing
(libp2p signs a stored value with the key of whoever stored it, trap 7), so every reader runs
`decode_and_verify`: size first (before msgpack sees a byte), then the exact schema and bounds,
then "the public key derives the peer id named" and "that key signed these fields", then our own
expiry (libp2p's TTLs are fixed 24-48 h constants; a dead peer must vanish in minutes).

A withdrawal is the same schema with an empty span (start == end) and no addresses, signed under
a different signature kind, so an announcement's signature can never be replayed as a withdrawal
or the other way round. It carries a higher seq and so replaces the announcement.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any

import msgpack
from multiaddr import Multiaddr

from molink.crypto.identity import Identity, peer_id_from_public_key
from molink.crypto.signing import SignatureError, sign_record, verify_record
from molink.dht.model_keys import MODEL_KEY_HEX_CHARS

ANNOUNCE_KIND = "molink.span.announce/v1"
WITHDRAW_KIND = "molink.span.withdraw/v1"

MAX_RECORD_BYTES = 6144  # every field at its cap: ~4.8 KB; a typical record: ~500 B (+75 B per next_rtts entry)
DEFAULT_TTL = 180.0  # seconds; announcers refresh every ~60 s, so a dead peer lingers <= 3 min
MAX_TTL = 3600.0  # a record may not claim to live longer than this past the reader's clock
MAX_CLOCK_SKEW = 60.0  # tolerance added to MAX_TTL only (expired is expired)
MAX_ADDRS = 16
MAX_ADDR_CHARS = 200  # 16 of these still fit MAX_RECORD_BYTES with every other field at its cap
MAX_BLOCK_INDEX = 1 << 16  # no model has 65k blocks; bounds arithmetic done on these values
MAX_THROUGHPUT = 1e12
MAX_CACHE_TOKENS = 1 << 40
MAX_VERSION_CHARS = 64
MAX_SEQ = (1 << 63) - 1
PEER_ID_MAX_CHARS = 64
MAX_NEXT_RTTS = 16  # peers a record may report round trips to (its successors in the model)
MAX_RTT = 60.0  # seconds; anything slower is a broken path, not a delay worth routing around
MAX_SESSIONS = 1 << 20
REACHABILITY_VALUES = ("public", "private", "unknown")
MAX_MACHINE_CORES = 1 << 16
_MACHINE_RE = re.compile(r"^([0-9a-f]{16})?$")  # peer/machine.py: 64-bit keyed hash, or "" (unknown)
MAX_PREFILL_SECONDS = 60.0  # per block: a chunk slower than this is a broken peer, not a cost to plan with

_MODEL_KEY_RE = re.compile(rf"^[0-9a-f]{{{MODEL_KEY_HEX_CHARS}}}$")
_VERSION_RE = re.compile(r"^[\x21-\x7e]{1,%d}$" % MAX_VERSION_CHARS)
_PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{1,%d}$" % PEER_ID_MAX_CHARS)  # base58btc


class RecordError(Exception):
    """A span record is unacceptable; subclasses say why."""


class RecordTooLarge(RecordError):
    pass


class MalformedRecord(RecordError):
    """Not msgpack, wrong envelope, wrong field set, wrong types or out-of-range values."""


class BadSignature(RecordError):
    """Missing, malformed, or made by another key or for another record kind."""


class ForgedRecord(RecordError):
    """The public key in the record does not derive the peer id it names."""


class RecordExpired(RecordError):
    pass


class RecordFromFuture(RecordError):
    """Expiry further ahead than MAX_TTL (+ skew): would pin a stale record for too long."""


class WrongKey(RecordError):
    """The record is for another model or peer than the DHT key it was found under."""


class StaleRecord(RecordError):
    """A newer record (higher seq) for the same key is already stored."""


_seq_lock = threading.Lock()
_last_seq = 0


def next_seq() -> int:
    """Strictly increasing within a process, and ~wall-clock nanoseconds across restarts."""
    global _last_seq
    with _seq_lock:
        _last_seq = max(time.time_ns(), _last_seq + 1)
        return _last_seq


@dataclass(frozen=True)
class SpanRecord:
    """One peer's announcement for one model.

    throughput: block-forwards per second for a single decode token at batch 1, i.e. a client
    routing k of this peer's blocks estimates k / throughput seconds of compute per token.
    (Per-block units keep sub-span routing honest; a whole-span figure would not.)
    free_cache_tokens: KV-cache tokens (per block) the peer can still give new sessions.
    sessions: sessions open on the peer when it signed the record (a load figure for routing;
    per-token queue lengths change in milliseconds and would be stale long before anyone read them).
    next_rtts: smoothed round trips (seconds) from this peer to peers serving the blocks right after
    its span (peer/neighbours.py), as sorted (peer_id, seconds) pairs; a msgpack map on the wire.
    A client routing p -> q in push mode pays p's RTT to q, which only p can measure.
    prefill_cost: (fixed, per_token) seconds per block of a prompt chunk of n tokens (fixed +
    per_token x n), fitted by the peer to the chunks it ran (peer/cost_curve.py PrefillCost); empty
    when unknown. A client sizes a prompt's chunks with it (swarm/prefill_plan.py).
    machine, machine_cores: an opaque id of the machine (and device) the peer computes on, and how
    many forwards it runs side by side (peer/machine.py): peers with one id compete for its cores.
    """

    model_key: str
    peer_id: str
    public_key: bytes
    start: int
    end: int
    addrs: tuple[str, ...]
    throughput: float
    free_cache_tokens: int
    version: str
    seq: int
    expires_at: float
    sessions: int = 0
    next_rtts: tuple[tuple[str, float], ...] = ()
    reachability: str = "unknown"  # dht/reachability.py: public | private (announces relayed addrs) | unknown
    prefill_cost: tuple[float, ...] = ()
    machine: str = ""
    machine_cores: int = 0

    def __post_init__(self) -> None:
        # Callers may pass a list; keep the frozen record immutable (and comparable) throughout.
        object.__setattr__(self, "addrs", tuple(self.addrs))
        # A map would make the record unhashable; sorted pairs are one canonical value per content.
        rtts = self.next_rtts.items() if isinstance(self.next_rtts, dict) else self.next_rtts
        try:
            object.__setattr__(self, "next_rtts", tuple(sorted((k, float(v) if type(v) is int else v)
                                                               for k, v in rtts)))
        except (TypeError, ValueError) as exc:  # unsortable keys, pairs that are not pairs
            raise MalformedRecord("next_rtts must map peer ids to seconds") from exc
        object.__setattr__(self, "prefill_cost", tuple(self.prefill_cost))
        # Signed bytes must decode back to the same types: floats stay floats on the wire.
        for name in ("throughput", "expires_at"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    @classmethod
    def create(
        cls,
        identity: Identity,
        model_key: str,
        start: int,
        end: int,
        addrs: list[str] | tuple[str, ...],
        throughput: float,
        free_cache_tokens: int,
        version: str,
        *,
        ttl: float = DEFAULT_TTL,
        now: float | None = None,
        sessions: int = 0,
        next_rtts: dict[str, float] | None = None,
        reachability: str = "unknown",
        prefill_cost: tuple[float, float] | None = None,
        machine: str = "",
        machine_cores: int = 0,
    ) -> "SpanRecord":
        now = time.time() if now is None else now
        record = cls(
            model_key=model_key,
            peer_id=identity.peer_id.to_base58(),
            public_key=identity.public_key,
            start=start,
            end=end,
            addrs=tuple(addrs),
            throughput=float(throughput),
            free_cache_tokens=free_cache_tokens,
            version=version,
            seq=next_seq(),
            expires_at=now + ttl,
            sessions=sessions,
            next_rtts=tuple((next_rtts or {}).items()),
            reachability=reachability,
            prefill_cost=tuple(float(x) for x in prefill_cost) if prefill_cost else (),
            machine=machine,
            machine_cores=machine_cores,
        )
        record.check_fields()
        return record

    @classmethod
    def withdrawal(
        cls, identity: Identity, model_key: str, version: str, *, ttl: float = DEFAULT_TTL,
        now: float | None = None,
    ) -> "SpanRecord":
        """A record that replaces this peer's announcement (higher seq) and lists no span."""
        return cls.create(identity, model_key, 0, 0, (), 0.0, 0, version, ttl=ttl, now=now)

    def refreshed(self, *, ttl: float = DEFAULT_TTL, now: float | None = None) -> "SpanRecord":
        """Same content, a new seq and a new expiry: what a periodic re-announce sends."""
        now = time.time() if now is None else now
        return replace(self, seq=next_seq(), expires_at=now + ttl)

    @cached_property
    def next_rtt_map(self) -> dict[str, float]:
        """next_rtts as a dict, built once per record (routing looks pairs up in its inner loop)."""
        return dict(self.next_rtts)

    @property
    def is_withdrawal(self) -> bool:
        return self.start == self.end

    @property
    def kind(self) -> str:
        return WITHDRAW_KIND if self.is_withdrawal else ANNOUNCE_KIND

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["addrs"] = list(self.addrs)
        d["next_rtts"] = dict(self.next_rtts)
        d["prefill_cost"] = list(self.prefill_cost)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "SpanRecord":
        """Build from decoded msgpack, checking the exact field set, types and bounds."""
        # Records signed before `reachability` (or the costs and machine) existed lack them (unknown, empty).
        if not isinstance(d, dict) or set(d) not in _ACCEPTED_FIELD_SETS:
            raise MalformedRecord("record must be a map with exactly the span record fields")
        for name, types in _FIELD_TYPES.items():
            if name not in d:
                continue
            # bool is an int subclass; a True where a count belongs is a malformed record
            if not isinstance(d[name], types) or isinstance(d[name], bool):
                raise MalformedRecord(f"field {name!r} has type {type(d[name]).__name__}")
        if not all(isinstance(a, str) for a in d["addrs"]):
            raise MalformedRecord("addrs must be strings")
        # Bound the map before touching its items: a hostile record must not make us sort 10k keys
        # (the byte limit already caps it; this keeps the check independent of that limit).
        if len(d["next_rtts"]) > MAX_NEXT_RTTS:
            raise MalformedRecord(f"next_rtts has more than {MAX_NEXT_RTTS} entries")
        if not all(isinstance(k, str) and type(v) is float for k, v in d["next_rtts"].items()):
            raise MalformedRecord("next_rtts must map peer id strings to float seconds")
        if "prefill_cost" in d and not (len(d["prefill_cost"]) in (0, 2)
                                        and all(type(x) is float for x in d["prefill_cost"])):
            raise MalformedRecord("prefill_cost must be empty or two float seconds")
        record = cls(**d)
        record.check_fields()
        return record

    def check_fields(self) -> None:
        """Bounds and formats that do not depend on the clock."""
        if not _MODEL_KEY_RE.match(self.model_key):
            raise MalformedRecord("model_key must be 40 lowercase hex characters")
        if len(self.public_key) != 32:
            raise MalformedRecord("public_key must be 32 raw Ed25519 bytes")
        if not 0 < len(self.peer_id) <= PEER_ID_MAX_CHARS:
            raise MalformedRecord("peer_id has a bad length")
        if not 0 <= self.start <= self.end <= MAX_BLOCK_INDEX:
            raise MalformedRecord(f"bad span [{self.start}, {self.end})")
        if len(self.addrs) > MAX_ADDRS:
            raise MalformedRecord(f"more than {MAX_ADDRS} addresses")
        if self.is_withdrawal and (self.start, self.addrs, self.sessions, self.next_rtts) != (0, (), 0, ()):
            raise MalformedRecord("a withdrawal has span [0, 0), no addresses, sessions or rtts")
        for addr in self.addrs:
            if not 0 < len(addr) <= MAX_ADDR_CHARS:
                raise MalformedRecord("address too long or empty")
            try:
                Multiaddr(addr)
            except Exception as exc:  # multiaddr raises a zoo of types for bad input
                raise MalformedRecord(f"bad multiaddr {addr!r}: {exc}") from exc
        if not (math.isfinite(self.throughput) and 0.0 <= self.throughput <= MAX_THROUGHPUT):
            raise MalformedRecord("throughput out of range")
        if not 0 <= self.free_cache_tokens <= MAX_CACHE_TOKENS:
            raise MalformedRecord("free_cache_tokens out of range")
        if not (type(self.sessions) is int and 0 <= self.sessions <= MAX_SESSIONS):
            raise MalformedRecord("sessions out of range")
        if len(self.next_rtts) > MAX_NEXT_RTTS:
            raise MalformedRecord(f"next_rtts has more than {MAX_NEXT_RTTS} entries")
        if len({peer for peer, _ in self.next_rtts}) != len(self.next_rtts):
            raise MalformedRecord("next_rtts names a peer twice")  # the wire map could not say both
        for peer, rtt in self.next_rtts:
            if not (isinstance(peer, str) and _PEER_ID_RE.match(peer) and peer != self.peer_id):
                raise MalformedRecord("next_rtts keys must be other peers' base58 ids")
            if not (isinstance(rtt, float) and math.isfinite(rtt) and 0.0 < rtt < MAX_RTT):
                raise MalformedRecord(f"next_rtts values must be seconds in (0, {MAX_RTT:.0f})")
        if self.prefill_cost and not (len(self.prefill_cost) == 2 and all(
                isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= MAX_PREFILL_SECONDS for x in self.prefill_cost)):
            raise MalformedRecord(f"prefill_cost must be (fixed, per_token) seconds in [0, {MAX_PREFILL_SECONDS:.0f}]")
        if self.is_withdrawal and (self.prefill_cost or self.machine or self.machine_cores):
            raise MalformedRecord("a withdrawal carries no costs or machine")
        if not (isinstance(self.machine, str) and _MACHINE_RE.match(self.machine)):
            raise MalformedRecord("machine must be 16 lowercase hex characters or empty")
        if not (type(self.machine_cores) is int and 0 <= self.machine_cores <= MAX_MACHINE_CORES):
            raise MalformedRecord("machine_cores out of range")
        if self.reachability not in REACHABILITY_VALUES:
            raise MalformedRecord(f"reachability must be one of {REACHABILITY_VALUES}")
        if not _VERSION_RE.match(self.version):
            raise MalformedRecord("version must be 1-64 printable ASCII characters")
        if not 0 <= self.seq <= MAX_SEQ:
            raise MalformedRecord("seq out of range")
        if not math.isfinite(self.expires_at):
            raise MalformedRecord("expires_at must be finite")

    def check_time(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self.expires_at <= now:
            raise RecordExpired(f"record expired {now - self.expires_at:.0f} s ago")
        if self.expires_at > now + MAX_TTL + MAX_CLOCK_SKEW:
            raise RecordFromFuture("record expiry is too far in the future")

    def sign(self, identity: Identity) -> bytes:
        """The envelope bytes to store in the DHT, signed under this record's kind."""
        if identity.public_key != self.public_key:
            raise ValueError("a span record can only be signed by the peer it names")
        self.check_fields()
        d = self.to_dict()
        return encode_envelope(d, sign_record(identity, self.kind, d))


_FIELD_NAMES = frozenset(f.name for f in fields(SpanRecord))
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "model_key": str, "peer_id": str, "public_key": bytes, "start": int, "end": int,
    "addrs": list, "throughput": float, "free_cache_tokens": int, "version": str, "seq": int,
    "expires_at": float, "sessions": int, "next_rtts": dict, "reachability": str, "prefill_cost": list,
    "machine": str, "machine_cores": int,
}
_COSTS_AND_MACHINE = frozenset({"prefill_cost", "machine", "machine_cores"})  # added together: older records lack all three
_ACCEPTED_FIELD_SETS = (_FIELD_NAMES, _FIELD_NAMES - _COSTS_AND_MACHINE, _FIELD_NAMES - _COSTS_AND_MACHINE - {"reachability"})


def encode_envelope(record_dict: dict[str, Any], sig: bytes) -> bytes:
    """Low level: wrap fields and a signature. `SpanRecord.sign` is the normal way in."""
    return msgpack.packb({"record": record_dict, "sig": sig}, use_bin_type=True,
                         use_single_float=False)


def decode_and_verify(
    data: bytes,
    *,
    now: float | None = None,
    max_bytes: int = MAX_RECORD_BYTES,
    expected_model_key: str | None = None,
    expected_peer_id: str | None = None,
) -> SpanRecord:
    """Return the record in `data` or raise a RecordError subclass; never anything else."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedRecord("record bytes expected")
    if len(data) > max_bytes:  # before msgpack allocates anything
        raise RecordTooLarge(f"{len(data)} bytes > {max_bytes}")
    try:
        env = msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError, bad UTF-8: ValueError; unhashable keys: TypeError
        raise MalformedRecord(f"not msgpack: {type(exc).__name__}") from exc
    if not isinstance(env, dict) or set(env) != {"record", "sig"}:
        raise MalformedRecord("envelope must be a map {record, sig}")
    record = SpanRecord.from_dict(env["record"])
    if not isinstance(env["sig"], bytes):
        raise BadSignature("signature must be bytes")
    # Ownership before signature: a key that is not the named peer's is a forgery however it signs.
    if peer_id_from_public_key(record.public_key).to_base58() != record.peer_id:
        raise ForgedRecord("public key does not derive the peer id named in the record")
    try:
        verify_record(record.public_key, record.kind, env["record"], env["sig"])
    except SignatureError as exc:
        raise BadSignature(str(exc)) from exc
    if expected_model_key is not None and record.model_key != expected_model_key:
        raise WrongKey("record is for another model")
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        raise WrongKey("record names another peer than its DHT key")
    record.check_time(now)
    return record


def best_record_index(
    values: list[bytes], *, now: float | None = None,
    accept: Callable[[SpanRecord], None] | None = None, **expect: str,
) -> int:
    """Index of the valid record with the highest seq (ties: larger bytes, so every node agrees).

    `expect` goes to decode_and_verify; `accept` may raise RecordError to veto a record.
    Invalid or expired values never win; with no valid value at all, 0 (libp2p wants an index).
    """
    best, best_rank = 0, None
    for i, value in enumerate(values):
        try:
            record = decode_and_verify(value, now=now, **expect)
            if accept is not None:
                accept(record)
        except RecordError:
            continue
        rank = (record.seq, bytes(value))
        if best_rank is None or rank > best_rank:
            best, best_rank = i, rank
    return best
