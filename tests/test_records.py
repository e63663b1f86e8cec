"""Span records: schema, signatures, expiry, selection, model keys, weights fingerprints."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import replace

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molink.crypto.identity import Identity
from molink.crypto.signing import sign_record
from molink.dht.model_keys import model_dht_key, weights_fingerprint
from molink.dht.records import (
    ANNOUNCE_KIND,
    MAX_NEXT_RTTS,
    MAX_RECORD_BYTES,
    MAX_TTL,
    WITHDRAW_KIND,
    BadSignature,
    ForgedRecord,
    MalformedRecord,
    RecordError,
    RecordExpired,
    RecordFromFuture,
    RecordTooLarge,
    SpanRecord,
    WrongKey,
    best_record_index,
    decode_and_verify,
    encode_envelope,
)

ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))
MODEL = model_dht_key("tiny-llama", {"hidden_size": 64, "num_hidden_layers": 8}, "00" * 32)
ADDR = "/ip4/127.0.0.1/tcp/4001"
BOB = Identity(bytes(range(2, 34))).peer_id.to_base58()


def make(identity: Identity = ALICE, **overrides) -> SpanRecord:
    record = SpanRecord.create(identity, MODEL, 2, 6, [ADDR], 123.5, 4096, "0.1.0")
    return replace(record, **overrides) if overrides else record


def envelope_of(record_dict: dict, sig: bytes) -> bytes:
    return encode_envelope(record_dict, sig)


def test_round_trip() -> None:
    record = make()
    decoded = decode_and_verify(record.sign(ALICE), expected_model_key=MODEL,
                                expected_peer_id=ALICE.peer_id.to_base58())
    assert decoded == record
    assert decoded.addrs == (ADDR,) and not decoded.is_withdrawal


def test_withdrawal_round_trip_and_kind() -> None:
    withdrawal = SpanRecord.withdrawal(ALICE, MODEL, "0.1.0")
    assert withdrawal.is_withdrawal and withdrawal.kind == WITHDRAW_KIND
    assert decode_and_verify(withdrawal.sign(ALICE)) == withdrawal


def test_forged_key_not_matching_peer_id() -> None:
    # Mallory signs correctly with her key but names Alice as the peer: forged.
    d = make(public_key=MALLORY.public_key).to_dict()
    with pytest.raises(ForgedRecord):
        decode_and_verify(envelope_of(d, sign_record(MALLORY, ANNOUNCE_KIND, d)))


def test_signed_by_another_key() -> None:
    # Alice's id and key, Mallory's signature.
    d = make().to_dict()
    with pytest.raises(BadSignature):
        decode_and_verify(envelope_of(d, sign_record(MALLORY, ANNOUNCE_KIND, d)))


def test_sign_refuses_foreign_identity() -> None:
    with pytest.raises(ValueError):
        make().sign(MALLORY)


@pytest.mark.parametrize("sig", [b"", b"\x00" * 64, b"\x01" * 63, "not bytes", None])
def test_unsigned_or_garbage_signature(sig) -> None:
    d = make().to_dict()
    with pytest.raises(BadSignature):
        decode_and_verify(msgpack.packb({"record": d, "sig": sig}, use_bin_type=True))


def test_missing_signature_field() -> None:
    with pytest.raises(MalformedRecord):
        decode_and_verify(msgpack.packb({"record": make().to_dict()}, use_bin_type=True))


@pytest.mark.parametrize("field,value", [
    ("start", 0), ("end", 8), ("addrs", ["/ip4/6.6.6.6/tcp/1"]), ("throughput", 9e9),
    ("free_cache_tokens", 1), ("seq", 1), ("version", "9.9.9"), ("sessions", 7),
    ("next_rtts", {BOB: 0.5}), ("next_rtts", {}),
])
def test_tampered_field(field, value) -> None:
    record = make(sessions=2, next_rtts={BOB: 0.003})
    d = record.to_dict()
    sig = sign_record(ALICE, ANNOUNCE_KIND, d)
    tampered = dict(d, **{field: value})
    with pytest.raises(BadSignature):
        decode_and_verify(envelope_of(tampered, sig))


def test_expired_and_far_future() -> None:
    now = time.time()
    with pytest.raises(RecordExpired):
        decode_and_verify(make(expires_at=now - 1).sign(ALICE), now=now)
    with pytest.raises(RecordFromFuture):
        decode_and_verify(make(expires_at=now + MAX_TTL * 2).sign(ALICE), now=now)
    # the same bytes are fine at a time when they are live
    data = make(expires_at=now + 100).sign(ALICE)
    decode_and_verify(data, now=now)
    with pytest.raises(RecordExpired):
        decode_and_verify(data, now=now + 101)


def test_oversized_rejected_before_decoding() -> None:
    # Not even msgpack: the size check must fire first.
    with pytest.raises(RecordTooLarge):
        decode_and_verify(b"\xc1" * (MAX_RECORD_BYTES + 1))
    with pytest.raises(RecordTooLarge):
        decode_and_verify(make().sign(ALICE), max_bytes=64)


def test_withdrawal_signature_is_not_an_announcement() -> None:
    d = make().to_dict()
    with pytest.raises(BadSignature):
        decode_and_verify(envelope_of(d, sign_record(ALICE, WITHDRAW_KIND, d)))
    w = SpanRecord.withdrawal(ALICE, MODEL, "0.1.0").to_dict()
    with pytest.raises(BadSignature):
        decode_and_verify(envelope_of(w, sign_record(ALICE, ANNOUNCE_KIND, w)))


def test_wrong_model_or_peer_for_key() -> None:
    data = make().sign(ALICE)
    with pytest.raises(WrongKey):
        decode_and_verify(data, expected_model_key="f" * 40)
    with pytest.raises(WrongKey):
        decode_and_verify(data, expected_peer_id=MALLORY.peer_id.to_base58())


@pytest.mark.parametrize("overrides", [
    {"start": 5, "end": 4}, {"start": -1}, {"end": 1 << 20}, {"addrs": [ADDR] * 17},
    {"addrs": ["not a multiaddr"]}, {"addrs": ["/ip4/1.2.3.4/tcp/1" + "0" * 300]},
    {"throughput": float("nan")}, {"throughput": -1.0}, {"free_cache_tokens": -5},
    {"version": ""}, {"version": "x" * 65}, {"seq": -1}, {"model_key": "ABC"},
    {"public_key": b"\x00" * 31}, {"expires_at": float("inf")},
    {"start": 3, "end": 3},  # a withdrawal must be [0, 0) with no addresses
    {"sessions": -1}, {"sessions": 1 << 40},
    # next_rtts: bounded, finite, 0 < rtt < 60, keys other peers' base58 ids
    {"next_rtts": {Identity.generate().peer_id.to_base58(): 0.01 for _ in range(MAX_NEXT_RTTS + 1)}},
    {"next_rtts": {BOB: float("nan")}}, {"next_rtts": {BOB: float("inf")}}, {"next_rtts": {BOB: 0.0}},
    {"next_rtts": {BOB: -0.1}}, {"next_rtts": {BOB: 60.0}}, {"next_rtts": {"": 0.1}},
    {"next_rtts": {"0OIl": 0.1}}, {"next_rtts": {"z" * 65: 0.1}}, {"next_rtts": {BOB.encode(): 0.1}},
    {"next_rtts": {ALICE.peer_id.to_base58(): 0.1}},  # its own id: not a next hop
    # prefill_cost: empty or (fixed, per_token) finite seconds in [0, 60]
    {"prefill_cost": [float("nan"), 1e-5]}, {"prefill_cost": [0.001, float("inf")]}, {"prefill_cost": [-0.1, 1e-5]},
    {"prefill_cost": [0.001, 61.0]}, {"prefill_cost": [0.001]}, {"prefill_cost": [0.001, 1e-5, 1.0]},
    # machine: "" or 16 lowercase hex; machine_cores: 0 (unknown) to 65536
    {"machine": "0123456789ABCDEF"}, {"machine": "0" * 15}, {"machine": "0" * 17}, {"machine": "g" * 16},
    {"machine_cores": -1}, {"machine_cores": (1 << 16) + 1},
])
def test_out_of_range_values(overrides) -> None:
    d = dict(make().to_dict(), **overrides)
    data = envelope_of(d, b"\x00" * 64)
    with pytest.raises(MalformedRecord):
        decode_and_verify(data)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("seq"),
    lambda d: d.update(extra="field"),
    lambda d: d.update(start=True),
    lambda d: d.update(start=1.0),
    lambda d: d.update(throughput=1),  # ints are not floats on the wire
    lambda d: d.update(public_key="text"),
    lambda d: d.update(addrs="/ip4/1.2.3.4/tcp/1"),
    lambda d: d.update(addrs=[1, 2]),
    lambda d: d.pop("next_rtts"),  # a record of the previous schema: strict, no silent default
    lambda d: d.update(sessions=True),
    lambda d: d.update(sessions=1.0),
    lambda d: d.update(next_rtts=[[BOB, 0.1]]),
    lambda d: d.update(next_rtts={BOB: 1}),  # ints are not floats on the wire
    lambda d: d.update(next_rtts={BOB: "0.1"}),
    lambda d: d.update(next_rtts={BOB: [0.1]}),
    lambda d: d.update(prefill_cost={"fixed": 0.001}),
    lambda d: d.update(prefill_cost=[1, 2]),  # ints are not floats on the wire
    lambda d: d.update(prefill_cost=["0.001", "1e-5"]),
    lambda d: d.update(machine=b"0123456789abcdef"),
    lambda d: d.update(machine_cores=2.0),
    lambda d: d.update(machine_cores=True),
])
def test_wrong_types(mutate) -> None:
    d = make().to_dict()
    mutate(d)
    with pytest.raises(MalformedRecord):
        decode_and_verify(envelope_of(d, sign_record(ALICE, ANNOUNCE_KIND, d)))


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\x93\x01\x02\x03", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}),
    msgpack.packb({"record": 1, "sig": 2}), b"\xdd\xff\xff\xff\xff", b"\x91" * 3000,
    msgpack.packb({"record": {}, "sig": b""}) + b"trailing",
])
def test_malformed_bytes(data) -> None:
    with pytest.raises(MalformedRecord):
        decode_and_verify(data)


def test_next_rtts_and_sessions_round_trip() -> None:
    carol = Identity.generate().peer_id.to_base58()
    record = make(sessions=3, next_rtts={carol: 0.25, BOB: 0.002})
    assert record.next_rtts == tuple(sorted({BOB: 0.002, carol: 0.25}.items()))  # one canonical order
    decoded = decode_and_verify(record.sign(ALICE))
    assert decoded == record and decoded.sessions == 3
    assert decoded.next_rtt_map == {BOB: 0.002, carol: 0.25}
    assert hash(decoded) == hash(record)  # frozen and hashable, like before the map existed
    assert SpanRecord.create(ALICE, MODEL, 0, 2, [ADDR], 1.0, 1, "v", next_rtts={BOB: 0.1}).next_rtt_map == {BOB: 0.1}
    with pytest.raises(MalformedRecord):  # sign() refuses what readers would refuse
        make(next_rtts={BOB: 99.0}).sign(ALICE)
    with pytest.raises(MalformedRecord):  # pairs naming a peer twice cannot travel as a map
        make(next_rtts=((BOB, 0.1), (BOB, 0.2))).sign(ALICE)
    with pytest.raises(MalformedRecord):  # a withdrawal carries no load or rtts
        replace(SpanRecord.withdrawal(ALICE, MODEL, "0.1.0"), next_rtts={BOB: 0.1}).sign(ALICE)


def test_prefill_cost_and_machine_round_trip_and_records_from_before_them_still_read() -> None:
    record = make(prefill_cost=(0.0012, 3.5e-5), machine="0123456789abcdef", machine_cores=8)
    decoded = decode_and_verify(record.sign(ALICE))
    assert decoded == record and decoded.prefill_cost == (0.0012, 3.5e-5) and hash(decoded) == hash(record)
    assert (decoded.machine, decoded.machine_cores) == ("0123456789abcdef", 8)
    assert (make().prefill_cost, make().machine, make().machine_cores) == ((), "", 0)  # unknown
    old = make().to_dict()
    for field in ("prefill_cost", "machine", "machine_cores"):
        del old[field]  # signed by a peer of the previous schema
    assert decode_and_verify(envelope_of(old, sign_record(ALICE, ANNOUNCE_KIND, old))).prefill_cost == ()
    for extra in ({"prefill_cost": [0.1, 0.1]}, {"machine": "0123456789abcdef"}):  # half a schema: refused
        half = dict(old, **extra)
        with pytest.raises(MalformedRecord):
            decode_and_verify(envelope_of(half, sign_record(ALICE, ANNOUNCE_KIND, half)))
    for change in ({"prefill_cost": (0.1, 0.1)}, {"machine": "0123456789abcdef"}, {"machine_cores": 2}):
        with pytest.raises(MalformedRecord):  # a withdrawal carries no costs or machine
            replace(SpanRecord.withdrawal(ALICE, MODEL, "0.1.0"), **change).sign(ALICE)


def test_highest_seq_selected() -> None:
    now = time.time()
    old, new = make(seq=10).sign(ALICE), make(seq=11).sign(ALICE)
    assert best_record_index([old, new], now=now) == 1
    assert best_record_index([new, old], now=now) == 0
    # garbage, forged and expired values never win, whatever seq they claim
    d = make(seq=99, public_key=MALLORY.public_key).to_dict()
    forged = envelope_of(d, sign_record(MALLORY, ANNOUNCE_KIND, d))
    expired = make(seq=100, expires_at=now - 1).sign(ALICE)
    assert best_record_index([b"junk", forged, expired, old], now=now) == 3
    # a withdrawal with a higher seq replaces the announcement
    withdrawal = SpanRecord.withdrawal(ALICE, MODEL, "0.1.0").sign(ALICE)
    assert best_record_index([new, withdrawal], now=now) == 1


def test_seq_is_monotonic_and_refresh_bumps_it() -> None:
    a, b = make(), make()
    assert b.seq > a.seq
    c = a.refreshed(ttl=60)
    assert c.seq > b.seq and c.start == a.start and c.expires_at > a.expires_at - 200


VALID = make(expires_at=time.time() + MAX_TTL - 60).sign(ALICE)  # live for the whole run


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=MAX_RECORD_BYTES + 10))
def test_random_bytes_only_record_errors(data: bytes) -> None:
    try:
        decode_and_verify(data)
    except RecordError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_mutated_valid_record_never_crashes(edits) -> None:
    data = bytearray(VALID)
    for pos, byte in edits:
        data[pos] = byte
    try:
        record = decode_and_verify(bytes(data))
    except RecordError:
        return
    # a mutation that still verifies must have left the signed content untouched
    assert record == decode_and_verify(VALID)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(make().to_dict())), _json | st.binary(max_size=40),
                       max_size=11), st.binary(max_size=70))
def test_structured_garbage_only_record_errors(fields, sig) -> None:
    base = make().to_dict()
    base.update(fields)
    try:
        decode_and_verify(msgpack.packb({"record": base, "sig": sig}, use_bin_type=True))
    except RecordError:
        pass


def test_model_key_separates_weights_and_ignores_volatile_config() -> None:
    config = {"hidden_size": 64, "num_hidden_layers": 8, "rope_theta": 10000.0}
    k = model_dht_key("m", config, "aa")
    assert len(k) == 40 and int(k, 16) >= 0
    assert model_dht_key("m", config, "bb") != k
    assert model_dht_key("m", dict(config, hidden_size=65), "aa") != k
    assert model_dht_key("other", config, "aa") != k
    noisy = dict(config, transformers_version="9.9", _name_or_path="/home/x", dtype="bfloat16")
    assert model_dht_key("m", dict(reversed(list(noisy.items()))), "aa") == k


def _write_safetensors(path, tensors: dict[str, bytes]) -> None:
    header, offset = {}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset,
                                                                                offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(tensors.values()))


def test_weights_fingerprint(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    big = bytes(range(256)) * 100
    _write_safetensors(a / "model.safetensors", {"w1": big, "w2": b"\x01" * 10})
    _write_safetensors(b / "model.safetensors", {"w1": big, "w2": b"\x01" * 10})
    assert weights_fingerprint(a) == weights_fingerprint(b)
    # a "fine-tune": same names, shapes, sizes; one value in the middle of w1 changed
    tuned = bytearray(big)
    tuned[len(big) // 2] ^= 1
    _write_safetensors(b / "model.safetensors", {"w1": bytes(tuned), "w2": b"\x01" * 10})
    assert weights_fingerprint(a) != weights_fingerprint(b)
    with pytest.raises(FileNotFoundError):
        weights_fingerprint(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(ValueError):
        weights_fingerprint(tmp_path)


def test_weights_fingerprint_of_real_checkpoints(tiny_model_factory) -> None:
    # Same architecture, same shard layout, different seeds: only the tensor data differs.
    a = tiny_model_factory("llama", layers=2, shards=2)
    b = tiny_model_factory("llama", layers=2, shards=2, seed=1)
    assert len(list(a.glob("*.safetensors"))) == 2
    fa, fb = weights_fingerprint(a), weights_fingerprint(b)
    assert fa == weights_fingerprint(a) and fa != fb
    config = json.loads((a / "config.json").read_text())
    assert model_dht_key("tiny", config, fa) != model_dht_key("tiny", config, fb)


def test_record_at_every_cap_fits_the_size_limit() -> None:
    addr = "/dns4/" + ".".join(["a" * 60] * 3)[:182] + "/tcp/65535"
    rtts = {"z" * 60 + f"{i:04d}".translate(str.maketrans("0", "o")): 59.9 for i in range(MAX_NEXT_RTTS)}
    assert all(len(peer) == 64 for peer in rtts)
    record = SpanRecord.create(ALICE, "f" * 40, 65535, 65536, [addr] * 16, 1e12, 1 << 40, "v" * 64,
                               sessions=1 << 20, next_rtts=rtts, prefill_cost=(59.9, 59.9), machine="f" * 16,
                               machine_cores=1 << 16)
    data = record.sign(ALICE)
    assert len(data) <= MAX_RECORD_BYTES
    assert decode_and_verify(data) == record
    with pytest.raises(MalformedRecord):  # and sign() refuses what readers would refuse
        replace(record, addrs=(addr,) * 17).sign(ALICE)


def test_dht_validator_binds_records_to_their_key() -> None:
    from molink.dht.kademlia import SpanRecordValidator, value_key

    validator = SpanRecordValidator()
    key = value_key(MODEL, ALICE.peer_id.to_base58())
    assert len(key.encode()) <= 50  # py-libp2p servers reset FIND_NODE for longer keys
    old, new = make(seq=1).sign(ALICE), make(seq=2).sign(ALICE)
    validator.validate(key, old)
    with pytest.raises(WrongKey):  # Alice's genuine record under Mallory's key
        validator.validate(value_key(MODEL, MALLORY.peer_id.to_base58()), old)
    with pytest.raises(WrongKey):  # ... or under another model's key
        validator.validate(value_key("e" * 40, ALICE.peer_id.to_base58()), old)
    assert validator.select(key, [old, new]) == 1
    assert validator.select(key, [new, old]) == 0
    assert validator.select(key, [b"junk", old]) == 1
