"""One batched client-head step for every generation that needs logits at the same moment.

Every generation on a client ends each step with the final norm + lm_head over its last hidden
states. Run per generation on the event loop, that is one pass over the whole lm_head matrix per
session per token (SmolLM2's is 49152 x 576: ~15 ms on one core), and the loop that must pump
every session's streams is blocked meanwhile. `HeadBatcher` turns the requests of concurrent
generations into one forward: a request that finds a head step running queues, and the next step
takes every queued request at once (concatenated along the batch dimension, split back after)
and wakes them all together. The batched forward runs in a worker thread so the loop keeps
pumping streams.

A head cheaper than `min_batch_seconds` per row (a tiny model's: ~0.03 ms) is not shared: each
request runs at once on the loop, as if alone. Sharing it would save nothing and cost a thread
hand-off (~0.1 ms) and, worse, lockstep: generations woken together send their next steps
together, and a route's stages then work one after the other instead of on different sessions at
once (measured: 32 tiny sessions lost a third of their tokens/s).

No time window: before a step, the leader only yields to the loop a few times (microseconds) so
that results already read from the network join it; everything else joins the next step, which
starts as soon as the running one ends. A generation alone never waits for anyone.

What stays per generation, on the loop thread: logits processors and sampling (generation.py),
so each generation draws its random numbers in its own order, exactly as transformers does. The
batched lm_head is the same arithmetic per row as a lone one, up to float rounding of the matmul
(observed <= 2e-6, the order of the peers' own batching): greedy tokens are transformers'.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import trio

from molink.peer.families import ClientHead
from molink.swarm.pipeline_cost import HEAD_CURVE

MIN_BATCH_SECONDS = 0.001  # a one-row head step cheaper than this is not shared (see the module doc)
GATHER_PASSES = 3  # loop passes a leader yields before a step: a result read from a socket needs ~2
PROBE_RUNS = 3  # one-row head forwards timed once per batcher (the fastest counts: load only adds)


@dataclass(eq=False)
class _Request:
    hidden: torch.Tensor  # [rows, 1, hidden]: the last position of each row
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    wakeup: trio.Event | None = None  # set when a step computed it, or when it should lead the next

    @property
    def done(self) -> bool:
        return self.logits is not None or self.error is not None


@dataclass
class HeadStats:
    requests: int = 0  # logits requests (one per generation step)
    steps: int = 0  # head forwards run
    rows: int = 0  # rows through the head, all forwards
    max_rows: int = 0  # the largest forward
    batched_requests: int = 0  # requests that shared a forward with another
    threaded_steps: int = 0  # forwards run in a worker thread
    seconds: float = 0.0  # time in head forwards

    def as_dict(self) -> dict:
        return {"requests": self.requests, "steps": self.steps, "rows": self.rows, "max_rows": self.max_rows,
                "batched_requests": self.batched_requests, "threaded_steps": self.threaded_steps,
                "mean_requests_per_step": round(self.requests / self.steps, 2) if self.steps else 0.0,
                "seconds": round(self.seconds, 3)}


@dataclass(eq=False)
class HeadBatcher:
    """The client head shared by a client's generations; see the module doc."""

    head: ClientHead
    max_rows: int = 512  # rows per head forward (its transient logits: rows x vocab floats)
    min_batch_seconds: float = MIN_BATCH_SECONDS  # cheaper heads are not shared (module doc); 0: always
    stats: HeadStats = field(default_factory=HeadStats)
    generations: int = field(default=0, init=False)  # running now (they register with `generation()`)
    _queue: list[_Request] = field(default_factory=list, init=False, repr=False)  # waiting, oldest first
    _busy: bool = field(default=False, init=False, repr=False)  # a step is running (its leader awaits it)
    # a one-row head forward's cost, timed once on the loop thread (larger ones scaled by HEAD_CURVE).
    # Not from the steps themselves: a step in a worker thread waits for the GIL behind the busy loop
    # (up to the 5 ms switch interval), and a loaded machine inflates any one timing.
    _row_seconds: float | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, head: "ClientHead | HeadBatcher") -> "HeadBatcher":
        """The shared batcher, or a private one for a bare head (a lone generation: nothing to share)."""
        return head if isinstance(head, HeadBatcher) else cls(head)

    @property
    def needs_positions(self) -> bool:
        return self.head.needs_positions

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # a table lookup (microseconds per row): batching it would cost more than it saves
        return self.head.embed(input_ids, position_ids)

    @contextmanager
    def generation(self):
        """Held by a generation while it runs: leaders wait for no one when they are alone."""
        self.generations += 1
        try:
            yield self
        finally:
            self.generations -= 1

    async def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] (float32, the caller's own copy) for hidden states [rows, 1, hidden]."""
        request = _Request(hidden)
        self.stats.requests += 1
        cheap = self.step_seconds(1, hidden.shape[-1], hidden.dtype) < self.min_batch_seconds
        if (self.generations <= 1 or cheap) and not self._busy and not self._queue:
            self._run([request])  # alone (or not worth sharing): at once, on the loop, no checkpoint
            return self._result(request)
        self._queue.append(request)
        try:
            while not request.done:
                if self._busy:
                    request.wakeup = trio.Event()
                    await request.wakeup.wait()
                else:
                    await self._lead()
        except BaseException:
            if request in self._queue:  # cancelled before any step took it
                self._queue.remove(request)
                self._wake_next_leader()
            raise
        return self._result(request)

    async def _lead(self) -> None:
        """Run one step for the oldest queued requests; wake them, and the next leader if any wait."""
        self._busy = True
        batch: list[_Request] = []
        try:
            await self._gather()
            batch = self._take()
            rows = sum(request.hidden.shape[0] for request in batch)
            if self.step_seconds(rows, batch[0].hidden.shape[-1]) < self.min_batch_seconds:
                self._run(batch)
            else:
                self.stats.threaded_steps += 1
                # not abandoned on cancel: the thread sets every request's result before we go on
                await trio.to_thread.run_sync(self._run, batch)
        finally:
            self._busy = False
            for request in batch:
                if request.wakeup is not None:
                    request.wakeup.set()
            self._wake_next_leader()

    def _wake_next_leader(self) -> None:
        if not self._busy and self._queue and self._queue[0].wakeup is not None:
            self._queue[0].wakeup.set()

    async def _gather(self) -> None:
        for _ in range(GATHER_PASSES):
            if len(self._queue) >= self.generations:
                return  # every running generation is in: nobody left to wait for
            await trio.sleep(0)

    def _take(self) -> list[_Request]:
        """The oldest requests that can share a forward (same trailing shape and dtype), up to max_rows."""
        first = self._queue[0]
        batch, rows = [], 0
        for request in self._queue:
            hidden = request.hidden
            same_kind = hidden.shape[1:] == first.hidden.shape[1:] and hidden.dtype == first.hidden.dtype
            if batch and (not same_kind or rows + request.hidden.shape[0] > self.max_rows):
                break
            batch.append(request)
            rows += request.hidden.shape[0]
        del self._queue[:len(batch)]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """One head forward for the batch; sets each request's logits (or error). Any thread."""
        started = time.perf_counter()
        rows = [request.hidden.shape[0] for request in batch]
        try:
            hidden = batch[0].hidden if len(batch) == 1 else torch.cat([r.hidden for r in batch], dim=0)
            logits = self.head.logits(hidden)[:, -1]
            parts = (logits,) if len(batch) == 1 else torch.split(logits, rows, dim=0)
            for request, part in zip(batch, parts):
                request.logits = part.to(copy=True, dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
            if len(batch) == 1:
                batch[0].error = exc
            else:
                for request in batch:
                    self._run([request])
                return
        seconds = time.perf_counter() - started
        stats = self.stats
        stats.steps += 1
        stats.rows += sum(rows)
        stats.max_rows = max(stats.max_rows, sum(rows))
        stats.batched_requests += len(batch) if len(batch) > 1 else 0
        stats.seconds += seconds

    @staticmethod
    def _result(request: _Request) -> torch.Tensor:
        if request.error is not None:
            raise request.error
        return request.logits

    def step_seconds(self, rows: int, hidden_size: int, dtype: torch.dtype | None = None) -> float:
        """What one head forward of `rows` rows costs here (a one-row forward timed on first use)."""
        if self._row_seconds is None:
            probe = torch.zeros(1, 1, hidden_size, dtype=dtype or self.head.lm_head.weight.dtype)
            timings = []
            for _ in range(PROBE_RUNS):
                started = time.perf_counter()
                self.head.logits(probe)
                timings.append(time.perf_counter() - started)
            self._row_seconds = min(timings)
        return self._row_seconds * HEAD_CURVE.factor(rows)
