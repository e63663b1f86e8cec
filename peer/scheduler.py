"""The peer's step scheduler: continuous batching across sessions, decode first, a token budget per forward.

Every session's step is submitted here (handler.py) and waits for its result; one worker task runs
the forwards, one at a time, in rounds:

1. **Decode first**: every queued decode step (one new token per row), oldest first, up to
   `max_rows` rows, runs as ONE batched forward per group of steps that can share it
   (batched_span.py; same span and blocks). Steps a span cannot batch (sliding-window caches)
   run one by one, still ahead of any prefill.
2. **Then one prefill chunk**: the oldest prompt advances by at most `max_tokens` tokens. A
   1024-token prompt thus costs the running streams one chunk per token, not the whole prefill,
   and the prompt itself still advances every round (nobody starves: decodes are FIFO under the
   row limit, prompts FIFO among themselves and guaranteed a chunk per round).

Batching window: when decode steps of other active sessions (seen in the last ACTIVE_HORIZON) are
missing from the queue, the worker waits for them before a round, so steps pushed by the previous
peer a little apart still share a forward; it stops as soon as none is missing, when no step has
arrived for ARRIVAL_GAP (the previous peer's burst is over), or after the window: half the time
of one single-token forward of the span, at most `window`. Merging one straggler saves a whole
forward, so waiting up to half of one pays; a span that computes in 0.3 ms (a tiny model) thus
waits ~0.15 ms at most, a 17 ms one (10 SmolLM2 blocks on one CPU core) up to `window`. A lone
session never waits. Steps that arrive while a forward runs simply queue: most batching comes
from there.

Where a forward runs: one predicted to take under INLINE_COMPUTE_SECONDS runs on the event loop
(a thread hand-off costs more than a tiny model's whole forward), and so does a batch of decode
steps predicted under INLINE_DECODE_SECONDS (see _runs_inline); the prediction scales the
one-row cost with the rows like a decode forward does (flat up to BLOCKS_CURVE's free
rows: it reads every weight once however many rows it carries; peer/cost_curve.py),
so a tiny model's batch of 30 sessions still runs inline. The one-row cost starts from the
throughput measured at start and then follows the forwards run here (ForwardCost).

Admission is the session registry's (memory_cache.py: KV budget and session count, `busy`
beyond); here `max_rows` bounds one forward's batch and so its latency and transient memory.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import trio

from molink.peer.batched_span import StepWork, batch_key, batchable, step_batched
from molink.peer.cost_curve import ForwardCost, PrefillCost, timed
from molink.peer.span import SpanModel
from molink.peer.stacked_cache import StackGone

logger = logging.getLogger(__name__)

ACTIVE_HORIZON = 0.5  # a session that sent a decode step this recently is expected to send another
ARRIVAL_GAP = 0.001  # no step for this long: the burst from the previous peer is over
STEP_DEADLINE = 300.0  # a step not computed by then fails instead of hanging its session
INLINE_COMPUTE_SECONDS = 0.002  # shorter forwards run on the event loop: a thread hand-off costs ~0.3 ms
# decode batches up to this long run on the loop too: see StepScheduler._runs_inline
INLINE_DECODE_SECONDS = 0.008


# Python's cyclic collector, tuned once per process that serves steps (a peer, a client). Every step
# of every session allocates a few hundred short-lived objects (frames, dicts, trio's tasks and
# cancel scopes), so at the default threshold a young collection runs every 700 allocations; with
# torch and transformers loaded each took ~1 ms (a client at 32 tiny sessions: 1.2 s of collections
# in 27 s, 0.6 s of it two full passes, each a stall of every session). Every YOUNG_THRESHOLD
# allocations instead: 0.1 s in that run, and no full pass. Nothing is exempt from collection;
# cyclic garbage here is rare and small. MOLINK_GC_TUNING=0 leaves the collector as it is.
YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Space young collections out (see above); idempotent, and never lowers a larger threshold."""
    if os.environ.get("MOLINK_GC_TUNING", "1") in ("0", "off", "false"):
        return
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    window: float = 0.008  # the longest wait for missing steps, seconds (see the module doc)
    max_rows: int = 64  # rows (sequences) per batched forward
    max_tokens: int = 128  # token budget of one prefill chunk

    @classmethod
    def from_env(cls, **overrides) -> "BatchingConfig":
        """Defaults, then MOLINK_BATCHING=0|1, MOLINK_BATCH_WINDOW_MS, MOLINK_BATCH_ROWS, MOLINK_BATCH_TOKENS."""
        env = os.environ
        values = dict(enabled=env.get("MOLINK_BATCHING", "1") not in ("0", "off", "false"),
                      window=float(env.get("MOLINK_BATCH_WINDOW_MS", cls.window * 1000)) / 1000,
                      max_rows=int(env.get("MOLINK_BATCH_ROWS", cls.max_rows)),
                      max_tokens=int(env.get("MOLINK_BATCH_TOKENS", cls.max_tokens)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["window"] < 0 or values["max_rows"] < 1 or values["max_tokens"] < 1:
            raise ValueError("batching window must be >= 0, max rows and token budget >= 1")
        return cls(**values)


@dataclass(eq=False)
class PendingStep:
    """A submitted step and what became of it; a prompt keeps its place while its chunks run."""

    span: SpanModel
    work: StepWork
    arrived: float = field(default_factory=time.monotonic)
    done: trio.Event = field(default_factory=trio.Event)
    offset: int = 0  # prompt tokens already through the span
    chunks: list[torch.Tensor] = field(default_factory=list)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    abandoned: bool = False  # the submitter gave up: do not start it

    @property
    def is_decode(self) -> bool:
        return self.work.new_tokens == 1

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


@dataclass
class SchedulerStats:
    forwards: int = 0  # forwards run (batched or not)
    decode_rows: int = 0  # decode rows run, all forwards together
    decode_forwards: int = 0
    max_rows: int = 0  # the largest batch so far
    prefill_chunks: int = 0
    stacks_built: int = 0  # batched forwards that stacked their sessions' caches (stacked_cache.py)
    stacks_reused: int = 0  # ... that found them still stacked from the forward before
    threaded: int = 0  # forwards run in a worker thread (the others ran on the event loop)

    def as_dict(self) -> dict:
        mean = self.decode_rows / self.decode_forwards if self.decode_forwards else 0.0
        return {"forwards": self.forwards, "decode_forwards": self.decode_forwards, "decode_rows": self.decode_rows,
                "mean_decode_batch": round(mean, 2), "max_batch": self.max_rows, "prefill_chunks": self.prefill_chunks,
                "stacks_built": self.stacks_built, "stacks_reused": self.stacks_reused, "threaded": self.threaded}


@dataclass(eq=False)
class Job:
    """One forward's worth of work: `run` (in a thread or inline) sets its steps' results or errors."""

    steps: list[PendingStep]
    tokens: int
    run: Callable[[], None]
    prefill: bool = False  # a prompt chunk (its cost teaches PrefillCost too)


class StepScheduler:
    def __init__(self, config: BatchingConfig, throughput: float = 0.0, prefill_cost: PrefillCost | None = None):
        self.config = config
        # one row through one block: sizes the inline decision and the batching window; starts from
        # the throughput measured at start, then follows the forwards run here (cost_curve.py)
        self.cost = ForwardCost(throughput)
        self.prefill_cost = prefill_cost or PrefillCost()  # what prompt chunks cost here (announced)
        self.stats = SchedulerStats()
        self._queue: list[PendingStep] = []  # arrival order
        self._arrival = trio.Event()
        # id(SpanSession) -> (when it last sent a decode step, the session): a closed session
        # (its cache freed by the registry) or a collected one is not waited for
        self._last_decode: dict[int, tuple[float, weakref.ref]] = {}
        self._running = False
        self._idle = False  # the worker is parked in _wait_for_work
        self._closed = False

    # ------------------------------------------------------------------ submitters

    async def submit(self, span: SpanModel, work: StepWork) -> torch.Tensor:
        """Queue one step and wait for its output [b, n, hidden]; raises what computing it raised."""
        if self._closed:
            raise RuntimeError("the peer is stopping")
        item = PendingStep(span, work)
        if item.is_decode:
            self._last_decode[id(work.session)] = (item.arrived, weakref.ref(work.session))
            if self._runs_now(item):
                return self._run_here(item)
        self._queue.append(item)
        self._arrival.set()
        try:
            with trio.fail_after(STEP_DEADLINE):
                await item.done.wait()
        except BaseException:
            item.abandoned = True
            raise
        if item.error is not None:
            raise item.error
        return item.result

    # ------------------------------------------------------------------ the worker

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The worker: start it with nursery.start; it runs until cancelled, then fails what is left."""
        tune_gc()  # the span is loaded: from here on this process serves steps
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wait_for_work()
                await self._gather()
                for job in self._plan():
                    await self._execute(job)
        finally:
            self._closed = True
            for item in self._queue:
                item.fail(RuntimeError("the peer is stopping"))
            self._queue.clear()

    async def _wait_for_work(self) -> None:
        self._idle = True
        try:
            while not self._queue:
                self._arrival = trio.Event()
                await self._arrival.wait()
        finally:
            self._idle = False

    # ------------------------------------------------------------------ the lone session's fast path

    def _runs_now(self, item: PendingStep) -> bool:
        """A decode step the worker would run at once, alone and inline, runs in its submitter's task
        instead: the worker is parked, nothing is queued, no other session is expected to step (so
        no batching window would open) and the forward is cheap enough for the event loop. That
        saves two task switches per hop (~0.1 ms of a tiny model's ~1 ms per hop on loopback)."""
        return (self._idle and not self._queue and len(self._active_decodes()) <= 1
                and self._runs_inline(item.work.rows, item.work.session.end - item.work.session.start))

    def _run_here(self, item: PendingStep) -> torch.Tensor:
        """What _execute does with a one-step job, synchronously (nothing else runs meanwhile)."""
        self._timed_run(self._decode_job([item]))  # raises what the forward raised, as the worker delivers it
        if item.error is not None:  # the session was closed meanwhile
            raise item.error
        return item.result

    def _runs_inline(self, tokens: int, blocks: int, decode: bool = True) -> bool:
        """A forward predicted cheaper than a thread hand-off runs on the event loop; so does a batch
        of decode steps predicted under INLINE_DECODE_SECONDS. A worker thread only helps when the
        loop has work to do meanwhile and the forward leaves it the GIL (long matrix products do,
        a small model's many short ops do not: every op hands the GIL back and forth). While a
        decode batch runs, the steps arriving would only wait for the next batch anyway; timed by
        the wall clock on a busy machine, a tiny model's 24-row batch (~1 ms of CPU) looks > 2 ms,
        and sending those to threads cost 32 tiny sessions 5-15 % of their tokens/s (3 peers and
        a client on 2 cores, alternating runs). Prompt chunks keep the lower bound: reading the
        next chunk off the network while one computes is worth the hand-off (bench_wan: 1024
        tokens 162 ms threaded vs 196-217 inline)."""
        predicted = self.cost.predict(tokens, blocks)
        bound = INLINE_DECODE_SECONDS if decode else INLINE_COMPUTE_SECONDS
        return predicted is not None and predicted < bound

    def _timed_run(self, job: Job) -> None:
        """Run a job here and teach the cost model what it took."""
        _, seconds = timed(job.run)
        self._observe(job, seconds)

    def _observe(self, job: Job, seconds: float) -> None:
        self.cost.observe(job.tokens, _blocks(job), seconds)
        if job.prefill:
            self.prefill_cost.observe(job.tokens, _blocks(job), seconds)

    async def _gather(self) -> None:
        """Wait up to `window` for the decode steps of other active sessions (see module doc)."""
        if self.config.window <= 0 or not any(item.is_decode for item in self._queue):
            return
        deadline = trio.current_time() + self._window()
        # the sessions expected this round, minus those already queued; arrivals are checked off as
        # they come (each arrival costs O(1), not a pass over every session)
        missing = self._active_decodes() - {id(item.work.session) for item in self._queue if item.is_decode}
        seen = len(self._queue)
        while missing:
            self._arrival = trio.Event()
            with trio.move_on_at(min(deadline, trio.current_time() + ARRIVAL_GAP)):
                await self._arrival.wait()
            if not self._arrival.is_set():
                return  # the window is over, or the burst is
            for item in self._queue[seen:]:
                if item.is_decode:
                    missing.discard(id(item.work.session))
            seen = len(self._queue)

    def _window(self) -> float:
        """Half a single-token forward of the span (see the module doc), at most config.window."""
        item = next(item for item in self._queue if item.is_decode)
        session = item.work.session
        one = self.cost.predict(1, session.end - session.start)
        return self.config.window if one is None else min(self.config.window, 0.5 * one)

    def _active_decodes(self) -> set[int]:
        """The sessions that sent a decode step within ACTIVE_HORIZON and are still open."""
        now = time.monotonic()
        for key in [k for k, (t, ref) in self._last_decode.items()
                    if now - t > ACTIVE_HORIZON or ref() is None or ref().cache is None]:
            del self._last_decode[key]
        return set(self._last_decode)

    # ------------------------------------------------------------------ one round

    def _plan(self) -> list[Job]:
        """This round's forwards: decode groups first (FIFO under the row limit), then one prompt chunk."""
        self._queue = [item for item in self._queue if not item.abandoned]
        taken, rows = [], 0
        for item in self._queue:
            if item.is_decode:
                if taken and rows + item.work.rows > self.config.max_rows:
                    break  # the rest are the oldest of the next round
                taken.append(item)
                rows += item.work.rows
        jobs = [self._decode_job(group) for group in self._groups(taken)]
        taken_ids = {id(item) for item in taken}
        self._queue = [item for item in self._queue if id(item) not in taken_ids]
        prompt = next((item for item in self._queue if not item.is_decode), None)
        if prompt is not None:
            jobs.append(self._prefill_job(prompt, max(1, self.config.max_tokens // prompt.work.rows)))
        return jobs

    @staticmethod
    def _groups(items: list[PendingStep]) -> list[list[PendingStep]]:
        """Steps that can share a forward, in order of their oldest member; unbatchable ones alone."""
        groups: dict[tuple, list[PendingStep]] = {}
        for item in items:
            key = batch_key(item.span, item.work) if batchable(item.span, item.work.session) else (id(item),)
            groups.setdefault(key, []).append(item)
        return list(groups.values())

    def _decode_job(self, group: list[PendingStep]) -> Job:
        def run() -> None:
            live = [item for item in group if item.work.session.cache is not None]
            for item in group:
                if item.work.session.cache is None:
                    item.error = RuntimeError("the session was closed")
            try:
                outputs = step_batched(group[0].span, [item.work for item in live], self.stats) if live else []
            except Exception as exc:  # noqa: BLE001 - one bad step must not fail the others: run them alone
                if len(live) == 1:
                    raise
                if isinstance(exc, StackGone):  # a member closed meanwhile: expected, nothing went wrong
                    logger.debug("stack of %d sessions dissolved under the step; running them one by one", len(live))
                else:
                    logger.warning("batched step of %d sessions failed; running them one by one", len(live),
                                   exc_info=True)
                outputs = [_run_alone(item) for item in live]
            for item, output in zip(live, outputs):
                item.result = output
            self._count_decode(sum(item.work.rows for item in live))

        return Job(group, sum(item.work.rows for item in group), run)

    def _prefill_job(self, item: PendingStep, chunk: int) -> Job:
        def run() -> None:
            work, start = item.work, item.offset
            stop = min(work.new_tokens, start + chunk)
            item.chunks.append(item.span.step(work.session, work.hidden[:, start:stop], work.mask[:, start:stop]))
            item.offset = stop
            self.stats.forwards += 1
            self.stats.prefill_chunks += 1
            if stop == work.new_tokens:
                item.result = item.chunks[0] if len(item.chunks) == 1 else torch.cat(item.chunks, dim=1)

        return Job([item], work_tokens(item, chunk), run, prefill=True)

    def _count_decode(self, rows: int) -> None:
        self.stats.forwards += 1
        self.stats.decode_forwards += 1
        self.stats.decode_rows += rows
        self.stats.max_rows = max(self.stats.max_rows, rows)

    async def _execute(self, job: Job) -> None:
        """Run one job inline (tiny) or in a worker thread, then wake the steps it finished."""
        inline = self._runs_inline(job.tokens, _blocks(job), decode=not job.prefill)
        try:
            if inline:
                self._timed_run(job)
            else:
                self.stats.threaded += 1
                _, seconds = await trio.to_thread.run_sync(timed, job.run)
                self._observe(job, seconds)
        except Exception as exc:  # noqa: BLE001 - delivered to the step(s) it belongs to
            for item in job.steps:
                if item.result is None and item.error is None:
                    item.error = exc
        finished = [item for item in job.steps if item.result is not None or item.error is not None]
        if any(not item.is_decode for item in finished):  # a finished prompt leaves the queue
            self._queue = [other for other in self._queue if other not in finished]  # (decodes left it in _plan)
        for item in finished:
            item.done.set()
        # the steps it finished send their outputs on before the next job computes (an inline job
        # would otherwise hold them until it is done): woken now, they run in the loop's next batch;
        # trio runs a batch in random order, so we wait out two batches
        for _ in range(2):
            await trio.lowlevel.checkpoint()


def work_tokens(item: PendingStep, chunk: int) -> int:
    return item.work.rows * min(chunk, item.work.new_tokens - item.offset)


def _blocks(job: Job) -> int:
    session = job.steps[0].work.session
    return session.end - session.start


def _run_alone(item: PendingStep) -> torch.Tensor | None:
    work = item.work
    try:
        return item.span.step(work.session, work.hidden, work.mask)
    except Exception as exc:  # noqa: BLE001 - this step's own failure, for its own session
        item.error = exc
        return None
