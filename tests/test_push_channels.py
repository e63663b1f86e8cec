"""Shared push channels (peer/push_channels.py): one kept channel per next-hop peer across a WAN.

The opener is a stand-in (what it opens is a real direct channel in a peer: tests/test_swarm.py and
the WAN bench exercise that); here the pool's own rules: sharing only where told, replacing a
failed channel, closing idle ones, and a channel per session where sharing is off.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import torch
import trio
import trio.testing

from molink.peer import protocol as p
from molink.peer.span import SpanModel
from molink.peer.push_channels import PushChannels


@pytest.fixture(scope="module")
def span(tiny_model_factory):
    return SpanModel.load(tiny_model_factory("llama", layers=6), 0, 3, progress=False)


class StandInStream:
    def __init__(self, name: str):
        self.name, self.error, self.closed = name, None, False


def hop(peer_id: str) -> p.NextHop:
    return p.NextHop(peer_id, [], b"s" * 16)


def pool_with_log(share):
    opened: list[StandInStream] = []

    @asynccontextmanager
    async def opener(next_hop):
        stream = StandInStream(next_hop.peer_id)
        opened.append(stream)
        try:
            yield stream
        finally:
            stream.closed = True

    return PushChannels(opener, share=share), opened


async def test_sessions_to_a_far_peer_share_one_channel_and_a_near_one_gets_one_each(nursery):
    channels, opened = pool_with_log(share=lambda next_hop: next_hop.peer_id == "far")
    await nursery.start(channels.run)
    with trio.fail_after(5):
        async with channels.use(hop("far")) as a, channels.use(hop("far")) as b:
            assert a is b
        async with channels.use(hop("far")) as c:  # kept after its sessions ended
            assert c is a and not a.closed
        async with channels.use(hop("near")) as d, channels.use(hop("near")) as e:
            assert d is not e
        assert d.closed and e.closed  # a session's own channel ends with it
    assert [s.name for s in opened] == ["far", "near", "near"] and len(channels) == 1


async def test_a_failed_channel_is_replaced_and_an_idle_one_closes(nursery, monkeypatch):
    monkeypatch.setattr("molink.peer.push_channels.IDLE_CLOSE", 0.2)
    monkeypatch.setattr("molink.peer.push_channels.SWEEP_INTERVAL", 0.05)
    channels, opened = pool_with_log(share=lambda next_hop: True)
    await nursery.start(channels.run)
    with trio.fail_after(5):
        async with channels.use(hop("x")) as first:
            first.error = ConnectionResetError("gone")
        async with channels.use(hop("x")) as second:
            assert second is not first
        await trio.sleep(0.1)
        assert first.closed and not second.closed
        while not second.closed:  # unused for IDLE_CLOSE: swept
            await trio.sleep(0.05)
    assert len(channels) == 0 and channels.opened == 2


# ---------------------------------------------------------------------- the receiving side


async def test_one_channel_carrying_two_sessions_pushes_gives_each_its_own_steps_in_order(nursery, span):
    """handle_push over one channel with two sessions' steps interleaved (what a shared WAN channel
    carries): each session gets exactly what it gets alone, in its own order, on its own stream."""
    from tests.test_session_limits import handler_with

    handler, registry = handler_with(span)
    gen = torch.Generator().manual_seed(0)
    steps = {sid: [torch.randn(1, n, span.config.hidden_size, generator=gen) for n in (3, 1, 1)]
             for sid in (b"a" * 16, b"b" * 16)}
    expected = {}
    for sid, hidden in steps.items():  # alone, one after the other, on a session of its own
        alone = span.new_session(0, 3)
        expected[sid] = [span.step(alone, h, torch.ones(1, h.shape[1], dtype=torch.long)) for h in hidden]
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            await _push_two_sessions(nursery, handler, stack, steps, expected)
        nursery.cancel_scope.cancel()
    assert len(registry) == 0


async def _push_two_sessions(nursery, handler, stack, steps, expected) -> None:
    from molink.dht.streams import open_framed_stream
    from molink.dht.wire import Frame, decode_tensor, encode_tensor
    from tests.memory_streams import MemoryStream
    from tests.test_session_limits import open_frame, serve_pair

    clients = {}
    for sid in steps:
        clients[sid] = await stack.enter_async_context(open_framed_stream(await serve_pair(nursery, handler)))
        assert (await clients[sid].request(open_frame(sid), timeout=10)).type == p.OPENED
    push_end, peer_end = trio.testing.memory_stream_pair()

    async def serve_push():
        async with open_framed_stream(MemoryStream(peer_end)) as framed:
            await handler.handle_push(framed)

    nursery.start_soon(serve_push)
    async with open_framed_stream(MemoryStream(push_end)) as pusher:
        for index in range(3):
            for sid, hidden in steps.items():
                h = hidden[index]
                await pusher.send(Frame(p.PUSH, index + 1, {
                    "session_id": sid, "step": index + 1, "hidden": encode_tensor(h, codec="raw"),
                    "mask": encode_tensor(torch.ones(1, h.shape[1], dtype=torch.long), codec="raw")}))
        for sid, client in clients.items():
            for index in range(3):
                reply = await client.receive(timeout=10)
                assert reply.type == p.RESULT and reply.body["step"] == index + 1
                got = decode_tensor(reply.body["hidden"], p.PEER_WIRE_LIMITS)
                torch.testing.assert_close(got, expected[sid][index], rtol=0, atol=1e-5)
