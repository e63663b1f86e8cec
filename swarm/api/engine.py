"""The serving core: admission, limits and one generation, shared by every HTTP request.

Every request runs on the swarm model's own trio loop (see app.py): `Engine.run` opens a chain
through the swarm for the request, runs `generate_with_chain` in a task of its own and hands the
new tokens back through a memory channel, where they are turned into text deltas (stop strings
held back and cut) for the caller. Concurrent requests are separate swarm sessions, which the
peers batch together (continuous batching in peer/scheduler.py); the engine only bounds how many
run at once (429 past that) and how long each may take (504). On the client, their lm_head steps
share one batched forward (swarm/head_batcher.py), off the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
import trio

from molink.swarm.api.limits import ApiError, Limits
from molink.swarm.generation import generate_with_chain, merged_generation_config

CLOSE_TIMEOUT = 5.0  # a chain being torn down after cancellation still gets this long to say goodbye


@dataclass
class Job:
    """One generation, already validated (openai_compat.py builds it from a request)."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def options(self) -> dict:
        if self.temperature == 0:  # OpenAI's temperature 0 means greedy
            return dict(do_sample=False, max_new_tokens=self.max_new_tokens,
                        repetition_penalty=self.repetition_penalty)
        # top_k=0: OpenAI has no top-k, so the model's default (often 50) must not sneak in
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty)


@dataclass
class Result:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = "length"
    route: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def extension(self) -> dict:
        """What the OpenAI shape has no room for: who served it and how fast (the "molink" field)."""
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        decode = None
        if self.completion_tokens > 1 and self.last_token_at and self.last_token_at > self.first_token_at:
            decode = (self.completion_tokens - 1) / (self.last_token_at - self.first_token_at)
        total = (self.last_token_at or time.monotonic()) - self.started
        return {"route": self.route, "time_to_first_token_ms": None if ttft is None else round(1000 * ttft, 1),
                "tokens_per_second": None if decode is None else round(decode, 2),
                "seconds": round(total, 3)}


class TextAssembler:
    """Token ids in, text deltas out: holds back incomplete characters and possible stop strings.

    Decoding the whole completion each time (not token by token) keeps multi-token characters and
    tokenizers' spacing rules right; completions are capped, so the cost stays small.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def add(self, token_ids: list[int], final: bool = False) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            text = text[:cut]
        elif not final:
            if text.endswith("\ufffd"):  # half a character: the next token completes it
                return ""
            text = text[:len(text) - self._possible_stop_prefix(text)]
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta

    def _stop_at(self, text: str) -> int | None:
        # a stop string may straddle what was sent and what is new: search from before `sent`
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _possible_stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that could begin a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class _ChannelStreamer:
    """transformers' streamer protocol: new tokens go into a memory channel (put is sync)."""

    def __init__(self, send: trio.MemorySendChannel, on_token: Callable[[], None]):
        self.send = send
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first put is the prompt itself
            self.prompt_seen = True
            return
        self.on_token()
        self.send.send_nowait(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _route_of(chain) -> list[dict]:
    session = getattr(getattr(chain, "chain", chain), "session", None)  # FailoverChain's live session
    route = getattr(session, "route", None) or []
    rtts = session.measured_rtts() if session is not None and hasattr(session, "measured_rtts") else {}
    return [{"peer_id": hop.peer_id, "start": hop.start, "end": hop.end,
             "rtt_ms": round(1000 * rtts[hop.peer_id], 2) if hop.peer_id in rtts else None} for hop in route]


class Engine:
    def __init__(self, model, tokenizer, limits: Limits, model_id: str):
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_id = model_id
        self.created = int(time.time())
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.active = 0
        self.stats = {"requests": 0, "rejected": 0, "failed": 0, "timeouts": 0, "tokens": 0}
        self.eos = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def check_lengths(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if prompt_tokens > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                                f"{self.limits.max_prompt_tokens}", code="context_length_exceeded")
        if max_new_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_new_tokens}; this server allows at most {self.limits.max_tokens}",
                           param="max_tokens")
        if self.context_length and prompt_tokens + max_new_tokens > self.context_length:
            raise ApiError(400, f"this model's context is {self.context_length} tokens; the prompt ({prompt_tokens}) "
                                f"plus max_tokens ({max_new_tokens}) exceed it", param="max_tokens",
                           code="context_length_exceeded")

    def default_max_tokens(self, prompt_tokens: int) -> int:
        room = (self.context_length - prompt_tokens) if self.context_length else self.limits.max_tokens
        return max(1, min(self.limits.max_tokens, room))

    def admit(self) -> "_Slot":
        if self.active >= self.limits.max_concurrent:
            self.stats["rejected"] += 1
            raise ApiError(429, f"too many requests in flight ({self.active} of {self.limits.max_concurrent}); "
                                "retry in a moment", type="rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": "1"})
        return _Slot(self)

    async def run(self, job: Job, emit: Callable[[str], Awaitable[None]]) -> Result:
        """Generate, calling `emit(delta)` per piece of text; raises ApiError for what went wrong."""
        result = Result()
        assembler = TextAssembler(self.tokenizer, job.stop)
        outcome: dict = {}

        async def emit_text(delta: str) -> None:
            result.text += delta
            await emit(delta)

        with trio.move_on_after(self.limits.request_timeout) as deadline:
            async with trio.open_nursery() as nursery:
                send, receive = trio.open_memory_channel(math.inf)  # bounded by max_new_tokens
                nursery.start_soon(self._produce, job, send, result, outcome)
                async with receive:
                    async for ids in receive:
                        result.completion_tokens += len(ids)
                        result.last_token_at = time.monotonic()
                        if ids and ids[-1] in self.eos:
                            result.finish_reason = "stop"
                        delta = assembler.add(ids, final=False)
                        if delta:
                            await emit_text(delta)
                        if assembler.stopped:
                            result.finish_reason = "stop"
                            nursery.cancel_scope.cancel()  # the rest of the generation is not wanted
                            break
            if not assembler.stopped and "error" not in outcome:
                tail = assembler.add([], final=True)  # whatever was held back
                if tail:
                    await emit_text(tail)
        self.stats["tokens"] += result.completion_tokens
        if deadline.cancelled_caught:
            self.stats["timeouts"] += 1
            raise ApiError(504, f"the request took longer than {self.limits.request_timeout:g} s "
                                f"({result.completion_tokens} tokens generated)", type="timeout",
                           code="request_timeout")
        if "error" in outcome:
            self.stats["failed"] += 1
            raise outcome["error"]
        return result

    async def _produce(self, job: Job, send: trio.MemorySendChannel, result: Result, outcome: dict) -> None:
        input_ids = torch.tensor([job.input_ids], dtype=torch.long)
        config = merged_generation_config(self.model.generation_config, **job.options())
        chain = None
        # a seeded request draws from a generator of its own: the tokens of torch.manual_seed(seed) +
        # generate, whatever the other requests on this loop draw meanwhile (unseeded ones share torch's)
        generator = torch.Generator().manual_seed(job.seed) if job.seed is not None and job.temperature > 0 else None

        def on_token() -> None:
            if result.first_token_at is None:
                result.first_token_at = time.monotonic()
                result.route = _route_of(chain)

        async with send:
            try:
                chain = await self.model.open_chain(1, len(job.input_ids) + job.max_new_tokens)
                await generate_with_chain(self.model.head_batcher, chain, input_ids, None, config,
                                          _ChannelStreamer(send, on_token), generator=generator)
            except Exception as exc:  # the swarm failed us: say so in the HTTP answer
                outcome["error"] = swarm_error(exc)
            finally:
                if chain is not None:
                    result.route = result.route or _route_of(chain)
                    # shielded: a cancelled request must still release its KV caches on the peers
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
                        await chain.close()


class _Slot:
    def __init__(self, engine: Engine):
        self.engine = engine
        engine.active += 1
        engine.stats["requests"] += 1

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.engine.active -= 1


def swarm_error(exc: Exception) -> ApiError:
    """The swarm's failures as HTTP answers: capacity and routing problems are 503, not 500."""
    from molink.peer import protocol as p
    from molink.swarm.inference_errors import InferenceError
    from molink.swarm.routing import NoRouteError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NoRouteError):
        return ApiError(503, f"the swarm cannot serve this model right now: {exc}", type="server_error",
                        code="no_route", headers={"Retry-After": "10"})
    if isinstance(exc, InferenceError):
        code = "swarm_busy" if exc.code == p.BUSY else "swarm_error"
        return ApiError(503, f"the swarm failed this request: {exc}", type="server_error", code=code,
                        headers={"Retry-After": "5"})
    if isinstance(exc, (ConnectionError, OSError)):
        return ApiError(503, f"the swarm is unreachable: {exc}", type="server_error", code="swarm_unreachable")
    return ApiError(500, f"internal error: {exc!r}", type="server_error")
