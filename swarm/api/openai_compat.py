"""OpenAI's wire shapes: request validation, JSON answers and server-sent-event streams.

Requests are checked before they take a generation slot, so a bad request never waits and never
costs the swarm anything. Parameters OpenAI defines but we cannot honour (n > 1, logprobs,
penalties) are refused by name rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse

from molink.swarm.api.engine import Engine, Job
from molink.swarm.api.limits import ApiError

MAX_STOP_SEQUENCES = 4
CHARS_PER_TOKEN_BOUND = 32  # no tokenizer averages more: longer prompts are refused untokenized
THREAD_TOKENIZE_CHARS = 20_000  # tokenize longer texts in a worker thread: the loop serves tokens
ROLES = {"system", "user", "assistant", "developer", "tool"}
BODY_TIMEOUT = 30.0
SEND_GRACE = 10.0  # after the request deadline, the last events get this long to reach the client


async def read_json(request: Request, max_bytes: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body is {declared} bytes; this server accepts at most {max_bytes}",
                       code="request_too_large")
    body = bytearray()
    with trio.move_on_after(BODY_TIMEOUT) as scope:  # a client trickling its body holds nothing for long
        async for chunk in request.stream():  # counted as it arrives: no trusting the header
            body += chunk
            if len(body) > max_bytes:
                raise ApiError(413, f"request body exceeds {max_bytes} bytes", code="request_too_large")
    if scope.cancelled_caught:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s", code="request_timeout")
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return parsed


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} between {low} and {high}; got {value!r}", param=name)
    return value


def _refuse_unsupported(body: dict) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "logit_bias"):
        if body.get(name) not in (None, False, 0, [], {}):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported (use 'repetition_penalty')", param=name)


def _stop_of(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", param="stop")
    return stop


def check_model(engine: Engine, body: dict) -> None:
    model = body.get("model")
    if model is not None and model != engine.model_id:  # absent: the one model we serve
        raise ApiError(404, f"the model '{model}' does not exist here; this server serves '{engine.model_id}'",
                       param="model", code="model_not_found")


async def _encode(engine: Engine, text: str, special_tokens: bool) -> list[int]:
    if len(text) > engine.limits.max_prompt_tokens * CHARS_PER_TOKEN_BOUND:
        raise ApiError(400, f"the prompt is {len(text)} characters: far over this server's limit of "
                            f"{engine.limits.max_prompt_tokens} tokens", param="prompt",
                       code="context_length_exceeded")

    def encode() -> list[int]:
        return engine.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    return await trio.to_thread.run_sync(encode) if len(text) > THREAD_TOKENIZE_CHARS else encode()


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


async def chat_prompt(engine: Engine, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a 'role' among {sorted(ROLES)}", param="messages")
        clean.append({"role": m["role"], "content": _content_text(m.get("content", ""), i)})
    if not getattr(engine.tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
    try:
        text = engine.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template may refuse an order of roles (e.g. two user turns)
        raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from None
    return await _encode(engine, text, special_tokens=False)  # the template already wrote them


async def completion_prompt(engine: Engine, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return await _encode(engine, prompt, special_tokens=True)
    vocab = engine.model.config.vocab_size
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a string, or a list of token ids (batches of several prompts are not "
                        "supported)", param="prompt")


async def build_job(engine: Engine, body: dict, chat: bool) -> Job:
    check_model(engine, body)
    _refuse_unsupported(body)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    ids = await (chat_prompt(engine, body) if chat else completion_prompt(engine, body))
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    # OpenAI's defaults: 16 new tokens for completions, as many as fit for chat
    default = engine.default_max_tokens(len(ids)) if chat else min(16, engine.default_max_tokens(len(ids)))
    max_new = _number(body, name, default, 1, 10**9, integer=True)
    engine.check_lengths(len(ids), max_new)
    return Job(input_ids=ids, max_new_tokens=max_new,
               temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
               top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)) or 1e-9,
               top_k=_number(body, "top_k", 0, 0, 10**6, integer=True),
               repetition_penalty=_number(body, "repetition_penalty", None, 0.01, 10.0),
               seed=_number(body, "seed", None, -(2**63), 2**64 - 1, integer=True),
               stop=_stop_of(body))


class Shapes:
    """The ids, chunks and final answers of one request, in chat or completion form."""

    def __init__(self, engine: Engine, job: Job, chat: bool):
        self.chat = chat
        self.model = engine.model_id
        self.prompt_tokens = len(job.input_ids)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def usage(self, result) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": self.prompt_tokens + result.completion_tokens}

    def answer(self, result) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": None, "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage(result),
                "molink": result.extension()}

    def chunk(self, delta: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            body = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class EventStream:
    """An ASGI response streaming one generation as OpenAI's server-sent events.

    Headers go out with the first piece of text, so a request that fails before producing any
    (no route, swarm busy, timeout) still gets its proper HTTP status. A client that disconnects
    cancels the generation (its swarm session is closed, its slot freed).
    """

    def __init__(self, engine: Engine, job: Job, shapes: Shapes, include_usage: bool):
        self.engine, self.job, self.shapes = engine, job, shapes
        self.include_usage = include_usage
        self.started = False

    async def __call__(self, scope, receive, send) -> None:
        try:
            slot = self.engine.admit()  # taken here, so no path can leave it taken
        except ApiError as error:
            await error_response(error)(scope, receive, send)
            return
        # the engine keeps the generation to its deadline; this one also covers a client that
        # stops reading (sends block) after the generation ended
        with slot, trio.move_on_after(self.engine.limits.request_timeout + SEND_GRACE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                await self._stream(scope, send)
                nursery.cancel_scope.cancel()

    async def _start(self, send) -> None:
        if not self.started:
            self.started = True
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            if self.shapes.chat:
                await self._event(send, self.shapes.chunk(role=True))

    async def _event(self, send, data) -> None:
        await send({"type": "http.response.body", "body": sse(data), "more_body": True})

    async def _stream(self, scope, send) -> None:
        async def emit(delta: str) -> None:
            await self._start(send)
            await self._event(send, self.shapes.chunk(delta))

        try:
            result = await self.engine.run(self.job, emit)
        except ApiError as error:
            if not self.started:  # nothing sent yet: a plain HTTP error
                await error_response(error)(scope, None, send)
                return
            await self._event(send, error.body())  # mid-stream: OpenAI's in-band error event
        else:
            await self._start(send)
            last = self.shapes.chunk(finish_reason=result.finish_reason)
            last["molink"] = result.extension()
            await self._event(send, last)
            if self.include_usage:
                await self._event(send, {**self.shapes.chunk(), "choices": [], "usage": self.shapes.usage(result)})
        await self._event(send, "[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch_disconnect(receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return


async def completion_endpoint(request: Request, chat: bool):
    engine: Engine = request.app.state.engine
    body = await read_json(request, engine.limits.max_body_bytes)
    job = await build_job(engine, body, chat)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    shapes = Shapes(engine, job, chat)
    if stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return EventStream(engine, job, shapes, include_usage)
    with engine.admit():  # 429 when full; held until the answer is ready
        result = await engine.run(job, _discard)
    return JSONResponse(shapes.answer(result))


async def _discard(delta: str) -> None:
    pass


async def models_endpoint(request: Request):
    engine: Engine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [model_card(engine)]})


def model_card(engine: Engine) -> dict:
    return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "molink-swarm",
            "context_length": engine.context_length, "max_tokens": engine.limits.max_tokens}
