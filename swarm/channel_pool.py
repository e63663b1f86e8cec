"""The client's idle channels to peers, kept for its next session to the same peer.

A session's stream to a peer used to die with the session, so every new session paid a ticket,
a TCP connect and a hello per hop (three round trips on a WAN) and started on cold TCP windows (a
prompt waits for slow start). A stream whose session closed cleanly (the peer answered `closed`
and no step was left in flight) now goes back to this pool; the peer waits REUSE_TIMEOUT for the
next `open` on it (peer/handler.py), and the next session to that peer takes it warm. Streams
idle for IDLE_CLOSE, or failed meanwhile (heartbeats run while idle), are closed; a session
that failed never gives its streams back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from molink.dht.direct import framed_data_stream
from molink.dht.streams import FramedStream

IDLE_CLOSE = 20.0  # below the peer's REUSE_TIMEOUT (30 s): the client lets go first
MAX_IDLE_PER_PEER = 8  # below the peer's MAX_IDLE_STREAMS_PER_CLIENT (16)
SWEEP_INTERVAL = 5.0


@dataclass(eq=False)
class _Kept:
    framed: FramedStream
    idle_since: float | None = None  # None while a session holds it
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def healthy(self) -> bool:
        return self.framed.error is None and not self.done.is_set()


class ChannelPool:
    """`adopt` frames a freshly dialled stream in the pool's nursery (it outlives the session),
    `take` hands out an idle one, `release` gives one back (or closes it)."""

    def __init__(self, nursery_of: Callable[[], trio.Nursery]):
        self.nursery_of = nursery_of
        self._kept: dict[FramedStream, _Kept] = {}
        self._idle: dict[str, list[_Kept]] = {}
        self._sweeping = False
        self.reused = 0  # sessions' streams that were taken warm (tests, benchmarks)

    def take(self, peer_id: str) -> FramedStream | None:
        idle = self._idle.get(peer_id, [])
        while idle:
            kept = idle.pop()
            if kept.healthy and trio.current_time() - kept.idle_since < IDLE_CLOSE:
                kept.idle_since = None
                self.reused += 1
                return kept.framed
            kept.done.set()
        return None

    async def adopt(self, stream: Any, **frame_options: Any) -> FramedStream:
        nursery = self.nursery_of()
        if not self._sweeping:
            self._sweeping = True
            nursery.start_soon(self._sweep_forever)
        kept = await nursery.start(self._hold, stream, frame_options)
        self._kept[kept.framed] = kept
        return kept.framed

    def release(self, peer_id: str, framed: FramedStream, reuse: bool) -> None:
        kept = self._kept.get(framed)
        if kept is None:
            return
        idle = self._idle.setdefault(peer_id, [])
        if reuse and kept.healthy and len(idle) < MAX_IDLE_PER_PEER:
            kept.idle_since = trio.current_time()
            idle.append(kept)
        else:
            kept.done.set()

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def _hold(self, stream: Any, frame_options: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        kept = None
        try:
            async with framed_data_stream(stream, **frame_options) as framed:
                kept = _Kept(framed)
                task_status.started(kept)
                await kept.done.wait()
        except Exception:  # noqa: BLE001 - a failed idle stream just ends (its session saw the error)
            if kept is None:
                raise
        finally:
            if kept is not None:
                kept.done.set()
                self._kept.pop(kept.framed, None)

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = trio.current_time()
            for peer_id, idle in list(self._idle.items()):
                for kept in [k for k in idle if not k.healthy or now - k.idle_since >= IDLE_CLOSE]:
                    kept.done.set()
                    idle.remove(kept)
                if not idle:
                    del self._idle[peer_id]
