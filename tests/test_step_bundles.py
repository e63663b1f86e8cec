"""Step bundles (peer/step_bundles.py, swarm/step_bundles.py): many sessions' decode steps in one
frame at every hop. Each bundled step must be served exactly as if it had come alone; a client can
only step its own sessions; a malformed bundle hurts nobody. (Concurrent generations over real peer
processes travel bundled and still equal transformers token for token: tests/test_batching.py.)"""

from __future__ import annotations

import pytest
import torch
import trio

from molink.dht.streams import open_framed_stream
from molink.dht.wire import Frame, decode_tensor, encode_tensor
from molink.peer import protocol as p
from molink.peer.span import SpanModel
from tests.test_session_limits import handler_with, serve_pair


@pytest.fixture(scope="module")
def span(tiny_model_factory):
    return SpanModel.load(tiny_model_factory("llama"), 0, 3)


def open_last_hop(sid: bytes) -> Frame:
    return Frame(p.OPEN, 1, p.OpenRequest(sid, "key", 0, 3, 1, 32, None).to_body())


def item(sid: bytes, step: int, hidden: torch.Tensor) -> dict:
    return {"session_id": sid, "step": step, "hidden": encode_tensor(hidden, codec="raw"),
            "mask": encode_tensor(torch.ones(1, hidden.shape[1], dtype=torch.long), codec="raw")}


def alone(span, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a session of its own computes for these consecutive steps."""
    session = span.new_session()
    return [span.step(session, x, torch.ones(1, x.shape[1], dtype=torch.long)) for x in inputs]


async def open_sessions(nursery, handler, client: str, sids: list[bytes]):
    streams = []
    for sid in sids:
        raw = await serve_pair(nursery, handler, client)
        framed = await nursery.start(_framed, raw)
        assert (await framed.request(open_last_hop(sid), timeout=10)).type == p.OPENED
        streams.append(framed)
    return streams


async def _framed(raw, *, task_status=trio.TASK_STATUS_IGNORED):
    async with open_framed_stream(raw) as framed:
        task_status.started(framed)
        await trio.sleep_forever()


async def test_a_bundle_of_steps_is_answered_with_one_results_frame_equal_to_steps_alone(span):
    handler, _ = handler_with(span)
    hidden = span.config.hidden_size
    prompts = {b"a" * 16: torch.randn(1, 5, hidden), b"b" * 16: torch.randn(1, 3, hidden)}
    decodes = {sid: torch.randn(1, 1, hidden) for sid in prompts}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            first, second = await open_sessions(nursery, handler, "alice", list(prompts))
            for framed, (sid, x) in zip((first, second), prompts.items()):  # prompts alone, as clients do
                await framed.send(Frame(p.STEP, 2, item(sid, 1, x)))
                assert (await framed.receive(timeout=10)).type == p.RESULT
            # both sessions' decode steps in one frame, on the first session's stream
            await first.send(Frame(p.STEPS, 0, {"items": [item(sid, 2, x) for sid, x in decodes.items()]}))
            reply = await first.receive(timeout=10)
            assert reply.type == p.RESULTS
            got = {entry["session_id"]: entry for entry in reply.body["items"]}
            assert set(got) == set(prompts) and all(entry["step"] == 2 for entry in got.values())
            for sid in prompts:
                want = alone(span, [prompts[sid], decodes[sid]])[1]
                torch.testing.assert_close(decode_tensor(got[sid]["hidden"]), want, rtol=1e-5, atol=1e-5)
            nursery.cancel_scope.cancel()


async def test_a_client_cannot_step_another_clients_session_and_bad_bundles_hurt_nobody(span):
    handler, registry = handler_with(span)
    hidden = span.config.hidden_size
    mine, theirs = b"m" * 16, b"t" * 16
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (alice,) = await open_sessions(nursery, handler, "alice", [mine])
            (bob,) = await open_sessions(nursery, handler, "bob", [theirs])
            x = torch.randn(1, 2, hidden)
            # alice names bob's session next to her own: only hers is served
            await alice.send(Frame(p.STEPS, 0, {"items": [item(mine, 1, x), item(theirs, 1, x)]}))
            reply = await alice.receive(timeout=10)
            assert reply.type == p.RESULT and reply.body["step"] == 1  # one answer: her own, alone
            assert registry.get(theirs).span_session.seen_tokens == 0
            # malformed bundles: ignored, the stream and the session go on
            for body in ({"items": "x"}, {"items": []}, {"items": [1, 2]},
                         {"items": [item(mine, 2, x)] * (p.MAX_BUNDLE_ITEMS + 1)},
                         {"items": [{"session_id": [1, 2]}, {"session_id": b"?" * 16}]}):
                await alice.send(Frame(p.STEPS, 0, body))
            await bob.send(Frame(p.STEP, 2, item(theirs, 1, x)))  # bob's session is as he left it
            reply = await bob.receive(timeout=10)
            assert reply.type == p.RESULT
            torch.testing.assert_close(decode_tensor(reply.body["hidden"]), alone(span, [x])[0],
                                       rtol=1e-5, atol=1e-5)
            # her session named twice in one bundle: served once (two steps at once would race on its cache)
            y = torch.randn(1, 1, hidden)
            await alice.send(Frame(p.STEPS, 0, {"items": [item(mine, 2, y), item(mine, 2, y)]}))
            assert (await alice.receive(timeout=10)).body["step"] == 2
            await alice.send(Frame(p.STEP, 3, item(mine, 3, torch.randn(1, 1, hidden))))
            reply = await alice.receive(timeout=10)
            assert reply.type == p.RESULT and reply.body["step"] == 3
            assert registry.get(mine).span_session.seen_tokens == 4
            nursery.cancel_scope.cancel()

