"""Fuzzing what comes off the network: record validator, request decoders, direct-channel records
and the peer's session handler. Whatever the bytes, the answer is a typed error — never a crash,
a hang, or an unbounded allocation — and nothing else on the peer is disturbed.

The default suite runs a short pass; `pytest -m slow tests/test_fuzz.py` runs ≥ 100k examples of
each decoder (MOLINK_FUZZ_EXAMPLES overrides) and a long pass over the handler.
"""

from __future__ import annotations

import os

import msgpack
import pytest
import torch
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molink.crypto.identity import Identity
from molink.dht.direct import DirectChannel, DirectChannelError
from molink.dht.model_keys import model_dht_key
from molink.dht.records import RecordError, SpanRecord, decode_and_verify
from molink.dht.streams import STREAM_ERRORS, open_framed_stream
from molink.dht.wire import Frame, WireError, decode_frame_payload, decode_tensor, encode_tensor
from molink.peer import protocol as p
from molink.peer.handler import InferenceHandler
from molink.peer.memory_cache import SessionRegistry
from molink.peer.span import SpanModel
from tests.memory_streams import MemoryStream

LONG = int(os.environ.get("MOLINK_FUZZ_EXAMPLES", "100000"))


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# msgpack-able values, nested a little: what a hostile peer can put in any field
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70).filter(lambda i: -2**63 <= i < 2**64),
                    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=6)),
                      max_leaves=20)

ALICE = Identity(bytes(range(32)))
MODEL = model_dht_key("tiny", {"num_hidden_layers": 6}, "00" * 32)
VALID = SpanRecord.create(ALICE, MODEL, 0, 3, ["/ip4/127.0.0.1/tcp/4001"], 10.0, 100, "0.1.0").sign(ALICE)
RECORD_FIELDS = list(msgpack.unpackb(VALID)["record"])


# ---------------------------------------------------------------------- records


def check_record_bytes(data: bytes) -> None:
    try:
        decode_and_verify(data, expected_model_key=MODEL)
    except RecordError:
        pass


@pytest.mark.parametrize("examples", [pytest.param(300, id="short"),
                                      pytest.param(LONG, id="long", marks=pytest.mark.slow)])
def test_record_validator_answers_any_bytes_with_a_record_error(examples):
    @fuzz(examples)
    @given(st.one_of(st.binary(max_size=2048),
                     st.builds(lambda rec, sig: msgpack.packb({"record": rec, "sig": sig}, use_bin_type=True),
                               st.dictionaries(st.sampled_from(RECORD_FIELDS), values, max_size=len(RECORD_FIELDS)),
                               st.binary(max_size=80)),
                     st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6)
                     .map(lambda edits: bytes(mutate(VALID, edits)))))
    def run(data):
        check_record_bytes(data)

    run()


def mutate(data: bytes, edits) -> bytearray:
    out = bytearray(data)
    for position, value in edits:
        out[position] = value
    return out


# ---------------------------------------------------------------------- frames and requests


@pytest.mark.parametrize("examples", [pytest.param(300, id="short"),
                                      pytest.param(LONG, id="long", marks=pytest.mark.slow)])
def test_request_decoders_answer_any_body_with_typed_errors(examples):
    tensorish = st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "int64", "bfloat16", "float64", "x"]),
                                       "shape": st.lists(st.integers(-2, 70), max_size=4),
                                       "codec": st.sampled_from(["raw", "zstd", "lz4"]),
                                       "data": st.binary(max_size=600)})

    @fuzz(examples)
    @given(body=st.dictionaries(st.sampled_from(["session_id", "model_key", "start", "end", "batch_size",
                                                 "max_length", "next", "hidden", "mask", "step"]),
                                st.one_of(values, tensorish), max_size=10),
           payload=st.binary(max_size=512))
    def run(body, payload):
        try:
            p.OpenRequest.from_body(body, num_blocks=6)
        except p.ProtocolError:
            pass
        try:
            p.decode_step_tensors(body, p.PEER_WIRE_LIMITS, hidden_size=64, batch_size=1, room=16)
        except p.ProtocolError:
            pass
        try:
            decode_frame_payload(payload)
        except WireError:
            pass

    run()


@pytest.mark.parametrize("examples", [pytest.param(300, id="short"),
                                      pytest.param(LONG, id="long", marks=pytest.mark.slow)])
def test_stacked_bundles_unstack_into_consistent_items_or_fail_whole(examples):
    """Whatever a bundle says, unstacking gives items whose rows add up to the stack, or one
    ProtocolError for the whole frame."""
    tensorish = st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "int64", "bool", "x"]),
                                       "shape": st.lists(st.integers(-1, 6), max_size=4),
                                       "codec": st.sampled_from(["raw", "zstd"]),
                                       "data": st.binary(max_size=400)})
    real = st.builds(lambda rows, new: encode_tensor(torch.randn(rows, new, 8)), st.integers(1, 4), st.integers(1, 2))
    item = st.dictionaries(st.sampled_from(["session_id", "step", "rows", "hidden", "mask"]),
                           st.one_of(values, st.integers(0, 3)), max_size=5)

    @fuzz(examples)
    @given(items=st.one_of(values, st.lists(item, max_size=5)),
           stacked=st.one_of(values, st.dictionaries(st.sampled_from(["hidden", "mask", "x"]),
                                                     st.one_of(values, tensorish, real), max_size=3)))
    def run(items, stacked):
        try:
            unstacked = p.unstack_bundle({"items": items, "stacked": stacked}, p.PEER_WIRE_LIMITS, 8)
        except p.ProtocolError:
            return
        rows = [entry["hidden"].shape[0] for entry in unstacked if "rows" in entry]
        assert rows == [entry["rows"] for entry in unstacked if "rows" in entry]
        assert all(entry["hidden"].shape[2] == 8 for entry in unstacked if "rows" in entry)

    run()


def test_direct_channel_answers_any_bytes_with_a_channel_error():
    @fuzz(200)
    @given(st.binary(max_size=3000))
    def run(data):
        async def main():
            left, right = trio.testing.memory_stream_pair()
            channel = DirectChannel(right, os.urandom(32), os.urandom(32))
            await left.send_all(data)
            await left.send_eof()
            with trio.fail_after(5):
                try:
                    while await channel.read(65536):
                        pass
                except DirectChannelError:
                    pass

        trio.run(main)

    run()


# ---------------------------------------------------------------------- the session handler


@pytest.fixture(scope="module")
def span(tiny_model_factory):
    return SpanModel.load(tiny_model_factory("llama", layers=6), 0, 3, progress=False)


ERROR_CODES = {p.BAD_REQUEST, p.BUSY, p.WRONG_MODEL, p.NEXT_HOP_UNREACHABLE, p.INTERNAL, p.SESSION_EXPIRED}


def frames_strategy(hidden_size: int):
    good_open = st.builds(lambda sid, length: Frame(p.OPEN, 1, p.OpenRequest(sid, "key", 0, 3, 1, length, None).to_body()),
                          st.binary(min_size=16, max_size=16), st.integers(1, 64))
    step_body = st.fixed_dictionaries({
        "step": st.one_of(st.integers(-1, 5), values),
        "hidden": st.one_of(values, st.builds(lambda n: encode_tensor(torch.randn(1, n, hidden_size)), st.integers(1, 4)),
                            st.builds(lambda n: encode_tensor(torch.full((1, n, hidden_size), float("nan"))),
                                      st.integers(1, 2))),
        "mask": st.one_of(values, st.builds(lambda n: encode_tensor(torch.ones(1, n, dtype=torch.long)),
                                            st.integers(1, 4))),
    })
    any_frame = st.builds(Frame, st.sampled_from([p.OPEN, p.STEP, p.CLOSE, p.PUSH, "x"]), st.integers(0, 9),
                          st.dictionaries(st.text(max_size=10), values, max_size=5))
    steps = st.lists(st.one_of(st.builds(lambda b: Frame(p.STEP, 2, b), step_body), any_frame), max_size=5)
    return st.tuples(st.one_of(good_open, any_frame), steps)


def run_handler_session(span, first: Frame, rest: list[Frame]) -> list[Frame]:
    """Feed frames to a real InferenceHandler; return what it answered. The handler must finish."""
    replies: list[Frame] = []

    async def main():
        registry = SessionRegistry(10_000)
        handler = InferenceHandler(span, "key", registry, host=None, idle_timeout=5.0, throughput=0.0)
        run_workers = getattr(handler, "run_workers", None)
        client_end, peer_end = trio.testing.memory_stream_pair()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                if run_workers is not None:
                    await nursery.start(run_workers)

                async def serve():
                    async with open_framed_stream(MemoryStream(peer_end)) as framed:
                        await handler.handle_inference(framed)

                nursery.start_soon(serve)
                async with open_framed_stream(MemoryStream(client_end)) as client:
                    for frame in [first, *rest]:
                        try:
                            await client.send(frame)
                        except (ValueError, *STREAM_ERRORS):
                            break  # reserved type, or the handler already hung up
                    try:
                        await client.send(Frame(p.CLOSE, 3, {}))
                        while not replies or replies[-1].type != p.CLOSED:  # then it would wait for
                            replies.append(await client.receive(timeout=10))  # our next session
                    except STREAM_ERRORS:
                        pass
                nursery.cancel_scope.cancel()
        assert len(registry) == 0, "a session outlived its stream"

    trio.run(main)
    return replies


@pytest.mark.parametrize("examples", [pytest.param(40, id="short"),
                                      pytest.param(3000, id="long", marks=pytest.mark.slow)])
def test_session_handler_answers_hostile_frames_with_typed_errors(span, examples):
    @fuzz(examples)
    @given(frames_strategy(span.config.hidden_size))
    def run(frames):
        first, rest = frames
        for reply in run_handler_session(span, first, rest):
            assert reply.type in (p.OPENED, p.RESULT, p.CLOSED, p.ERROR), reply
            if reply.type == p.ERROR:
                assert reply.body["code"] in ERROR_CODES and reply.body["message"]

    run()


def test_the_harness_reaches_real_steps(span):
    """The fuzzed handler really computes: a well-formed open + step gets opened + result."""
    hidden = torch.randn(1, 2, span.config.hidden_size)
    opened = Frame(p.OPEN, 1, p.OpenRequest(b"s" * 16, "key", 0, 3, 1, 8, None).to_body())
    step = Frame(p.STEP, 2, {"step": 1, "hidden": encode_tensor(hidden),
                             "mask": encode_tensor(torch.ones(1, 2, dtype=torch.long))})
    replies = run_handler_session(span, opened, [step])
    assert [r.type for r in replies] == [p.OPENED, p.RESULT, p.CLOSED]
    session = span.new_session(0, 3)
    expected = span.step(session, hidden, torch.ones(1, 2, dtype=torch.long))
    assert torch.equal(decode_tensor(replies[1].body["hidden"]), expected)
