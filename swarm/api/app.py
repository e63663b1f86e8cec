"""The HTTP server: a Starlette app served by hypercorn's trio worker on the swarm model's loop.

Why on the model's loop: `DistributedModelForCausalLM` already runs a trio loop in a background
thread (the libp2p host, the DHT, every session's streams). Serving HTTP in that same loop lets a
request `await` its generation directly, with trio's own cancellation: a client that disconnects
or a request past its deadline cancels its swarm session at once, with no thread per request and
no token handed between loops. The caller's thread only waits for `stop()`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from molink.swarm.api.engine import Engine
from molink.swarm.api.limits import ApiError, Limits
from molink.swarm.api.openai_compat import completion_endpoint, error_response, model_card, models_endpoint
from molink.swarm.api.swarm_map import SwarmMap

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
GRACEFUL_SECONDS = 2.0  # open streams get this long to finish when the server stops


def create_app(engine: Engine, swarm_map: SwarmMap) -> Starlette:
    async def chat(request: Request):
        return await completion_endpoint(request, chat=True)

    async def completions(request: Request):
        return await completion_endpoint(request, chat=False)

    async def model(request: Request):
        if request.path_params["model_id"] != engine.model_id:
            raise ApiError(404, f"the model '{request.path_params['model_id']}' does not exist here",
                           param="model", code="model_not_found")
        return JSONResponse(model_card(engine))

    async def swarm_json(request: Request):
        return JSONResponse(await swarm_map.snapshot(), headers={"cache-control": "no-store"})

    async def health(request: Request):
        return JSONResponse({"ok": True, "model": engine.model_id, "active_requests": engine.active})

    def page(name: str):
        async def serve(request: Request):
            return FileResponse(STATIC / name, headers={"cache-control": "no-cache"})
        return serve

    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(exc.status_code, message, type=kind, headers=exc.headers))

    async def server_error(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {exc!r}", type="server_error"))

    routes = [
        Route("/", page("chat.html")),
        Route("/swarm", page("swarm.html")),
        Route("/api/swarm", swarm_json),
        Route("/health", health),
        Route("/v1/models", models_endpoint),
        Route("/v1/models/{model_id:path}", model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                       Exception: server_error})
    app.state.engine = engine
    return app


class ApiServer:
    """Serves the API for one swarm model until `stop()` (thread- and signal-handler-safe)."""

    def __init__(self, model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                 limits: Limits | None = None):
        self.model = model
        self.engine = Engine(model, tokenizer, limits or Limits(), model_id)
        self.swarm_map = SwarmMap(model, self.engine)
        self.app = create_app(self.engine, self.swarm_map)
        self.host, self.port = host, port
        self.url: str | None = None
        self.ready = threading.Event()
        self._stopping = False
        self._stop_event: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Block, serving, until stop(). Runs on the model's event loop (see the module doc)."""
        self.model._run(self._serve, on_ready)

    async def _serve(self, on_ready) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = [f"{self.host}:{self.port}"]
        config.graceful_timeout = GRACEFUL_SECONDS
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        self._stop_event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        if self._stopping:  # stop() came before we got here
            self._stop_event.set()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, self.app, config, shutdown_trigger=self._stop_event.wait))
            self.url = binds[0] if binds else f"http://{self.host}:{self.port}"
            self.ready.set()
            if on_ready is not None:
                on_ready(self.url)
        logger.info("API server stopped")

    def stop(self) -> None:
        self._stopping = True
        if self._token is not None and self._stop_event is not None:
            try:
                # run_sync_soon is safe from any thread and from signal handlers
                self._token.run_sync_soon(self._stop_event.set)
            except trio.RunFinishedError:
                pass

    def run_until_interrupted(self, on_ready: Callable[[str], None] | None = None) -> None:
        """run() with Ctrl-C / SIGTERM calling stop(): the main thread waits in the model's loop."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, lambda signum, frame: self.stop())
        try:
            self.run(on_ready)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
