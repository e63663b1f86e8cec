"""Per-client and per-session caps on a peer (peer/session_limits.py), in-process: the registry,
the open gate, and a real InferenceHandler over in-memory streams (the flood against a real peer
process is tests/test_abuse.py)."""

from __future__ import annotations

import pytest
import torch
import trio
import trio.testing

from molink.dht.streams import STREAM_ERRORS, open_framed_stream
from molink.dht.wire import Frame, encode_tensor
from molink.peer import protocol as p
from molink.peer.handler import InferenceHandler
from molink.peer.memory_cache import ActiveSession, CacheBudgetExceeded, SessionRegistry
from molink.peer.session_limits import (
    OPEN_MAX_QUEUED_BYTES,
    OPEN_WIRE_LIMITS,
    LimitExceeded,
    OpenGate,
    SessionLimits,
    session_frame_bytes,
)
from molink.peer.span import SpanModel
from tests.memory_streams import MemoryStream


@pytest.fixture(scope="module")
def span(tiny_model_factory):
    return SpanModel.load(tiny_model_factory("llama", layers=6), 0, 3, progress=False)


def session(span, sid: bytes, tokens: int = 8, client: str | None = "alice") -> ActiveSession:
    return ActiveSession(session_id=sid, span_session=span.new_session(0, 3), batch_size=1, max_length=tokens,
                         reserved_tokens=tokens, client=client)


def test_registry_caps_sessions_per_client_and_tokens_per_session(span):
    registry = SessionRegistry(1000, 10, max_sessions_per_client=2, max_session_tokens=100)
    registry.add(session(span, b"a" * 16))
    registry.add(session(span, b"b" * 16))
    with pytest.raises(CacheBudgetExceeded) as refused:
        registry.add(session(span, b"c" * 16))
    assert refused.value.limit == "sessions_per_client" and "max 2 per client" in str(refused.value)
    registry.add(session(span, b"c" * 16, client="bob"))  # another client is not affected
    registry.add(session(span, b"d" * 16, client=None))  # unknown clients only meet the global caps
    with pytest.raises(CacheBudgetExceeded) as refused:
        registry.add(session(span, b"e" * 16, tokens=101, client="carol"))
    assert refused.value.limit == "session_tokens"
    registry.remove(b"a" * 16)
    registry.add(session(span, b"f" * 16))  # a closed session gives its slot back
    assert registry.per_client == {"alice": 2, "bob": 1}
    for sid in (b"b" * 16, b"c" * 16, b"d" * 16, b"f" * 16):
        registry.remove(sid)
    assert len(registry) == 0 and not registry.per_client and registry.reserved_tokens == 0


def test_open_gate_caps_opens_in_progress_and_releases_them():
    gate = OpenGate(SessionLimits(max_pending_opens=3, max_pending_opens_per_client=2))
    with gate.opening("alice"), gate.opening("alice"):
        with pytest.raises(LimitExceeded) as refused, gate.opening("alice"):
            pass
        assert refused.value.limit == "pending_opens_per_client" and refused.value.code == p.BUSY
        with gate.opening("bob"):
            with pytest.raises(LimitExceeded) as refused, gate.opening("carol"):
                pass
            assert refused.value.limit == "pending_opens"
    with pytest.raises(RuntimeError), gate.opening("alice"):
        raise RuntimeError("an open that failed")
    assert gate.pending == 0 and not gate.per_client and gate.refused == 2


def test_session_frames_are_bounded_by_what_the_session_can_send():
    assert session_frame_bytes(1, 8, 64) == 8 * (64 * 4 + 8) + (1 << 20)
    assert session_frame_bytes(64, 1 << 20, 8192) == p.PEER_WIRE_LIMITS.max_frame_bytes


def open_frame(sid: bytes = b"s" * 16, max_length: int = 8) -> Frame:
    return Frame(p.OPEN, 1, p.OpenRequest(sid, "key", 0, 3, 1, max_length, None).to_body())


def step_frame(span, tokens: int) -> Frame:
    hidden = torch.randn(1, tokens, span.config.hidden_size)
    return Frame(p.STEP, 2, {"step": 1, "hidden": encode_tensor(hidden, codec="raw"),
                             "mask": encode_tensor(torch.ones(1, tokens, dtype=torch.long), codec="raw")})


async def serve_pair(nursery, handler, client: str | None = "alice"):
    """A server-side framed stream configured like peer/server.py's, and the client's end."""
    client_end, peer_end = trio.testing.memory_stream_pair()

    async def serve():
        async with open_framed_stream(MemoryStream(peer_end, client), limits=OPEN_WIRE_LIMITS,
                                      max_queued_bytes=OPEN_MAX_QUEUED_BYTES) as framed:
            await handler.handle_inference(framed)

    nursery.start_soon(serve)
    return MemoryStream(client_end)


def handler_with(span, **limits) -> tuple[InferenceHandler, SessionRegistry]:
    session_limits = SessionLimits(**limits)
    registry = SessionRegistry(10_000, session_limits.max_sessions,
                               max_sessions_per_client=session_limits.max_sessions_per_client,
                               max_session_tokens=session_limits.max_session_tokens)
    return InferenceHandler(span, "key", registry, host=None, idle_timeout=30.0, limits=session_limits), registry


async def test_a_session_ends_at_its_maximum_duration_however_busy(span):
    handler, registry = handler_with(span, max_session_seconds=0.6)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            raw = await serve_pair(nursery, handler)
            async with open_framed_stream(raw) as client:
                assert (await client.request(open_frame(max_length=64), timeout=10)).type == p.OPENED
                started = trio.current_time()
                while True:  # a session that keeps stepping is not idle, but still ends
                    try:
                        await client.send(step_frame(span, 1))
                    except STREAM_ERRORS:
                        pass  # it expired meanwhile: its error frame is still ahead of the close
                    reply = await client.receive(timeout=10)
                    if reply.type == p.ERROR:
                        break
                    await trio.sleep(0.05)  # well inside the 64 tokens of room
                assert reply.body["code"] == p.SESSION_EXPIRED and reply.body["limit"] == "session_seconds"
                assert 0.5 < trio.current_time() - started < 5
            nursery.cancel_scope.cancel()
    assert len(registry) == 0


async def test_over_the_session_caps_a_client_gets_busy_with_the_limit_named(span):
    handler, registry = handler_with(span, max_sessions_per_client=1, max_pending_opens=1)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            first = await serve_pair(nursery, handler)
            async with open_framed_stream(first) as one:
                # a second stream while the first has not sent `open` yet: refused at once
                async with open_framed_stream(await serve_pair(nursery, handler, "bob")) as two:
                    refusal = await two.receive(timeout=10)
                    assert (refusal.body["code"], refusal.body["limit"]) == (p.BUSY, "pending_opens")
                assert (await one.request(open_frame(), timeout=10)).type == p.OPENED
                # the first session holds alice's only slot
                async with open_framed_stream(await serve_pair(nursery, handler)) as three:
                    refusal = await three.request(open_frame(b"t" * 16), timeout=10)
                    assert (refusal.body["code"], refusal.body["limit"]) == (p.BUSY, "sessions_per_client")
                    assert "max 1 per client" in refusal.body["message"]
            nursery.cancel_scope.cancel()


async def test_frames_larger_than_the_session_can_use_are_refused(span):
    handler, registry = handler_with(span)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            # before a session exists only a small `open` frame is accepted
            async with open_framed_stream(await serve_pair(nursery, handler)) as early:
                await early.send(step_frame(span, 400))  # ~100 KB instead of an open
                with pytest.raises(STREAM_ERRORS):
                    await early.receive(timeout=10)
            # a session of 8 tokens may send steps of up to 8 tokens, nothing near 160 MB
            async with open_framed_stream(await serve_pair(nursery, handler)) as client:
                assert (await client.request(open_frame(max_length=8), timeout=10)).type == p.OPENED
                assert (await client.request(step_frame(span, 4), timeout=10)).type == p.RESULT
                big = session_frame_bytes(1, 8, span.config.hidden_size) // (span.config.hidden_size * 4) + 16
                await client.send(step_frame(span, big))
                with pytest.raises(STREAM_ERRORS):
                    await client.receive(timeout=10)
            nursery.cancel_scope.cancel()
    assert len(registry) == 0


async def test_a_cleanly_closed_stream_carries_the_next_session_but_idle_ones_are_bounded(span, monkeypatch):
    """A client keeps the stream of a session it closed for its next one (swarm/channel_pool.py);
    the peer keeps at most MAX_IDLE_STREAMS_PER_CLIENT such streams waiting, and only REUSE_TIMEOUT."""
    monkeypatch.setattr("molink.peer.handler.MAX_IDLE_STREAMS_PER_CLIENT", 1)
    monkeypatch.setattr("molink.peer.handler.REUSE_TIMEOUT", 3.0)
    handler, registry = handler_with(span)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with open_framed_stream(await serve_pair(nursery, handler)) as kept, \
                    open_framed_stream(await serve_pair(nursery, handler)) as other:
                for session_id in (b"a" * 16, b"b" * 16):  # two sessions, one after the other, one stream
                    assert (await kept.request(open_frame(session_id), timeout=10)).type == p.OPENED
                    assert (await kept.request(step_frame(span, 3), timeout=10)).type == p.RESULT
                    assert (await kept.request(Frame(p.CLOSE, 9, {}), timeout=10)).type == p.CLOSED
                # `kept` now waits for a third session: alice's one idle stream; `other` is closed
                assert (await other.request(open_frame(b"c" * 16), timeout=10)).type == p.OPENED
                assert (await other.request(Frame(p.CLOSE, 9, {}), timeout=10)).type == p.CLOSED
                with pytest.raises(STREAM_ERRORS):
                    await other.receive(timeout=10)
                assert handler._idle_streams == {"alice": 1}  # `kept` still waits; `other` did not
                with pytest.raises(STREAM_ERRORS):  # and `kept` goes after REUSE_TIMEOUT
                    await kept.receive(timeout=10)
            nursery.cancel_scope.cancel()
    assert len(registry) == 0
