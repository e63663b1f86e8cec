"""One trio event loop in a background thread, for the synchronous Python API.

Researchers call the swarm from plain scripts and from Jupyter, where an asyncio loop already
runs in the main thread; a trio loop of our own in a daemon thread works in both. Long-lived
tasks (the libp2p host, the DHT, session streams) live in the loop's root nursery; `call` runs
one coroutine function there and returns its result (or raises its exception) in the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str = "molink-trio"):
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError("background trio loop failed to start") from self._error

    def _main(self) -> None:
        try:
            trio.run(self._root)
        except BaseException as exc:  # surfaced through call()/close()
            self._error = exc
        finally:
            self._ready.set()

    async def _root(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if not self._thread.is_alive():
            raise RuntimeError("the swarm's event loop has stopped") from self._error
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive() and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
