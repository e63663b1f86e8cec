"""Push channels: one shared, long-lived channel from this peer to each next-hop peer.

Every session whose route goes on at peer X pushes its outputs to X. Each session used to open a
channel of its own: a ticket over libp2p, a TCP connect and a hello (three round trips on a WAN
before the session could even open) and a cold TCP window (a prompt burst then waits round trips
for slow start). Now the pushes of all sessions to X share one channel, opened by the first
session and kept while in use; its TCP connections (and lanes, dht/direct_channel.py) keep their
congestion state from one session to the next. The receiving side already takes every push by
its session id (handler.handle_push), so nothing changes there.

Frames of one session stay in order (the stream's send lock keeps each sender's order); a prompt
chunk of one session can hold another's decode push back by its serialisation time (a 35 KB
chunk: 3 ms at 100 Mbit/s). A channel that fails is dropped: the sessions on it report the next
hop unreachable (their clients re-route, as before) and the next session opens a fresh one. A
channel nobody used for IDLE_CLOSE closes, well before the next hop's own idle timeout would close
it under a session.

Only on long paths (a WAN: connects to the next hop took LANE_RTT or more): on loopback and LANs
the round trips saved are worth nothing, and one channel per session lets the sessions' pushes
travel and arrive side by side, which the next hop's batching needs (measured on loopback, tiny
model, 32 sessions: 735 tokens/s with a channel per session, 565 shared; mean batch 6.5 vs 3.1).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import trio

from molink.dht.streams import FramedStream
from molink.peer import protocol as p

logger = logging.getLogger(__name__)

IDLE_CLOSE = 60.0  # seconds unused before a channel closes (the next hop's idle timeout is 300 s)
SWEEP_INTERVAL = 5.0

Opener = Callable[[p.NextHop], AbstractAsyncContextManager[FramedStream]]


@dataclass(eq=False)
class _Channel:
    framed: FramedStream
    users: int = 0
    last_used: float = field(default_factory=trio.current_time)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def healthy(self) -> bool:
        return self.framed.error is None and not self.done.is_set()


class PushChannels:
    """`async with channels.use(next_hop) as framed:` a shared channel to the next hop when
    `share(next_hop)` says so, else one of the session's own. Without `run()` under way (a handler
    in a unit test) every use opens a channel of its own."""

    def __init__(self, opener: Opener, share: Callable[[p.NextHop], bool] = lambda next_hop: True):
        self.opener = opener
        self.share = share
        self._channels: dict[str, _Channel] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.opened = 0  # channels opened so far (tests, status)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(SWEEP_INTERVAL)
                    self._sweep()
        finally:
            self._nursery = None

    def __len__(self) -> int:
        return sum(channel.healthy for channel in self._channels.values())

    @asynccontextmanager
    async def use(self, next_hop: p.NextHop) -> AsyncIterator[FramedStream]:
        if self._nursery is None or not self.share(next_hop):
            async with self.opener(next_hop) as framed:
                self.opened += 1
                yield framed
            return
        channel = await self._get(next_hop)
        channel.users += 1
        try:
            yield channel.framed
        finally:
            channel.users -= 1
            channel.last_used = trio.current_time()

    async def _get(self, next_hop: p.NextHop) -> _Channel:
        key = next_hop.peer_id
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # sessions opening together wait for one channel, not one each
            channel = self._channels.get(key)
            if channel is not None and channel.healthy:
                return channel
            if channel is not None:
                channel.done.set()
            channel = await self._nursery.start(self._hold, next_hop)
            self._channels[key] = channel
            self.opened += 1
            return channel

    async def _hold(self, next_hop: p.NextHop, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own one channel in the pool's nursery (it outlives the session that opened it); errors
        before it opened go to that session, after that they only end the channel."""
        started = False
        channel: _Channel | None = None
        try:
            async with self.opener(next_hop) as framed:
                channel = _Channel(framed)
                task_status.started(channel)
                started = True
                await channel.done.wait()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            if not started:
                raise
            logger.info("push channel to %s ended: %s", next_hop.peer_id, exc)
        finally:
            if channel is not None:
                channel.done.set()
                if self._channels.get(next_hop.peer_id) is channel:
                    del self._channels[next_hop.peer_id]

    def _sweep(self) -> None:
        now = trio.current_time()
        for channel in list(self._channels.values()):
            if not channel.healthy or (channel.users == 0 and now - channel.last_used > IDLE_CLOSE):
                channel.done.set()
