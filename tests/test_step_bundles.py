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
            # the outputs travel stacked: one tensor, each item naming its rows
            assert "stacked" in reply.body and all(entry["rows"] == 1 for entry in reply.body["items"])
            got = {entry["session_id"]: entry for entry in p.unstack_bundle(reply.body, p.PEER_WIRE_LIMITS, hidden)}
            assert set(got) == set(prompts) and all(entry["step"] == 2 for entry in got.values())
            for sid in prompts:
                want = alone(span, [prompts[sid], decodes[sid]])[1]
                torch.testing.assert_close(got[sid]["hidden"], want, rtol=1e-5, atol=1e-5)
            nursery.cancel_scope.cancel()


def stacked(entries: list[tuple[bytes, int, torch.Tensor]], own: dict | None = None) -> dict:
    """A steps body with these items' tensors stacked (and `own` = {sid: tensor} carried alone)."""
    items = [{"session_id": sid, "step": step, "rows": x.shape[0]} for sid, step, x in entries]
    items += [item(sid, step, x) for sid, (step, x) in (own or {}).items()]
    hidden = torch.cat([x for _, _, x in entries])
    return {"items": items, "stacked": {"hidden": encode_tensor(hidden, codec="raw"),
                                        "mask": encode_tensor(torch.ones(hidden.shape[:2], dtype=torch.long))}}


async def test_stacked_steps_and_items_with_tensors_of_their_own_are_served_alike(span):
    """Every session gets what it would alone, whether its step came stacked with others' or
    carrying its own tensors beside a stack (a client's audited session does)."""
    handler, _ = handler_with(span)
    hidden = span.config.hidden_size
    sids = [b"a" * 16, b"b" * 16, b"c" * 16]
    xs = {sid: [torch.randn(1, 1, hidden) for _ in range(2)] for sid in sids}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            first, *_ = await open_sessions(nursery, handler, "alice", sids)
            await first.send(Frame(p.STEPS, 0, stacked([(sid, 1, xs[sid][0]) for sid in sids])))
            await first.send(Frame(p.STEPS, 0, stacked([(sid, 2, xs[sid][1]) for sid in sids[:2]],
                                                       own={sids[2]: (2, xs[sids[2]][1])})))
            got = {}
            for _ in range(2):
                reply = await first.receive(timeout=10)
                assert reply.type == p.RESULTS
                for entry in p.unstack_bundle(reply.body, p.PEER_WIRE_LIMITS, hidden):
                    got[(entry["session_id"], entry["step"])] = entry["hidden"]
            for sid in sids:
                for step, want in enumerate(alone(span, xs[sid]), start=1):
                    torch.testing.assert_close(got[(sid, step)], want, rtol=1e-5, atol=1e-5)
            nursery.cancel_scope.cancel()


async def test_a_stack_that_does_not_add_up_is_refused_whole_and_a_bad_row_fails_only_its_session(span):
    handler, registry = handler_with(span)
    hidden = span.config.hidden_size
    a, b = b"a" * 16, b"b" * 16
    x = torch.randn(1, 1, hidden)
    good = stacked([(a, 1, x), (b, 1, x)])
    refused = [
        {**good, "stacked": {**good["stacked"], "hidden": encode_tensor(torch.randn(3, 1, hidden))}},  # 3 rows, 2 named
        {**good, "stacked": {**good["stacked"], "hidden": encode_tensor(torch.randn(2, 1, hidden + 1))}},
        {**good, "stacked": {**good["stacked"], "mask": encode_tensor(torch.ones(2, 2, dtype=torch.long))}},
        {**good, "stacked": {**good["stacked"], "hidden": encode_tensor(torch.ones(2, 1, hidden, dtype=torch.long))}},
        {**good, "stacked": "x"},
        {"items": good["items"]},  # rows of a stack it does not carry
        {**good, "stacked": {"mask": good["stacked"]["mask"]}},
        {**good, "items": [{**good["items"][0], "rows": 0}, good["items"][1]]},
        {**good, "items": [{**good["items"][0], "rows": True}, good["items"][1]]},
        {**good, "items": [{**good["items"][0], "hidden": good["stacked"]["hidden"]}, good["items"][1]]},
    ]
    for body in refused:
        with pytest.raises(p.ProtocolError):
            p.unstack_bundle(body, p.PEER_WIRE_LIMITS, hidden)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            first, second = await open_sessions(nursery, handler, "alice", [a, b])
            for body in refused:  # nothing is served, nothing answered, the streams go on
                await first.send(Frame(p.STEPS, 0, body))
            assert registry.get(a).span_session.seen_tokens == registry.get(b).span_session.seen_tokens == 0
            # a NaN in b's rows: b gets its error on its own stream, a its result
            poisoned = stacked([(a, 1, x), (b, 1, torch.full((1, 1, hidden), float("nan")))])
            await first.send(Frame(p.STEPS, 0, poisoned))
            reply = await first.receive(timeout=10)
            assert reply.type == p.RESULT and reply.body["step"] == 1  # a's alone: nothing to bundle it with
            torch.testing.assert_close(decode_tensor(reply.body["hidden"]), alone(span, [x])[0], rtol=1e-5, atol=1e-5)
            error = await second.receive(timeout=10)
            assert error.type == p.ERROR and error.body["code"] == p.BAD_REQUEST and "NaN" in error.body["message"]
            assert registry.get(b).span_session.seen_tokens == 0
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



class ResultsReader:
    """The parts of a RemoteSession that StepBundles.dispatch talks to."""

    def __init__(self, sid: bytes, hidden_size: int):
        self.route = [type("Hop", (), {"peer_id": "last"})()]
        self.session_ids, self.hidden_size = [sid], hidden_size
        self.results, self.failures = [], []

    def deliver_result(self, frame: Frame) -> None:
        self.results.append(frame)

    def fail_hop(self, index: int, error: Exception) -> None:
        self.failures.append((index, error))


def test_the_client_splits_stacked_results_and_fails_every_session_of_a_stack_that_does_not_add_up():
    from molink.swarm.step_bundles import StepBundles

    bundles = StepBundles()
    a, b = ResultsReader(b"a" * 16, 8), ResultsReader(b"b" * 16, 8)
    bundles.register(a)
    bundles.register(b)
    out = torch.randn(2, 1, 8)
    items = [{"session_id": b"a" * 16, "step": 4, "rows": 1}, {"session_id": b"b" * 16, "step": 7, "rows": 1}]
    bundles.dispatch("last", Frame(p.RESULTS, 0, {"items": items, "stacked": {"hidden": encode_tensor(out)}}))
    assert [f.body["step"] for f in a.results] == [4] and [f.body["step"] for f in b.results] == [7]
    assert torch.equal(a.results[0].body["hidden"], out[:1]) and torch.equal(b.results[0].body["hidden"], out[1:])
    # three rows for two items: neither answer can be trusted; both sessions learn it at once
    bad = {"items": items, "stacked": {"hidden": encode_tensor(torch.randn(3, 1, 8))}}
    bundles.dispatch("last", Frame(p.RESULTS, 0, bad))
    assert len(a.results) == len(b.results) == 1
    assert [index for index, _ in a.failures] == [0] and [index for index, _ in b.failures] == [0]
    # from a peer that is not these sessions' last hop: nobody is touched
    bundles.dispatch("someone", Frame(p.RESULTS, 0, bad))
    assert len(a.failures) == len(b.failures) == 1
