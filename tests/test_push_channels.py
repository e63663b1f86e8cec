"""Shared push channels (peer/push_channels.py): one kept channel per next-hop peer across a WAN.

The opener is a stand-in (what it opens is a real direct channel in a peer: tests/test_swarm.py and
the WAN bench exercise that); here the pool's own rules: sharing only where told, replacing a
failed channel, closing idle ones, and a channel per session where sharing is off.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from molink.peer import protocol as p
from molink.peer.push_channels import PushChannels


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
