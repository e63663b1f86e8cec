"""Prometheus metrics of a peer: `molink-peer join --metrics-port N` serves them at /metrics.

The collector reads the handler's counters and the KV-cache registry when scraped, so serving
costs nothing between scrapes and the hot path carries no metric updates. HTTP is hypercorn's
trio worker (the same stack as the API endpoint, molink.swarm.api) in a task of the peer's own
nursery; the app is a few lines of ASGI rather than prometheus_client's, which does not answer
ASGI lifespan events (hypercorn would log an error at every start).
"""

from __future__ import annotations

import logging

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("molink.peer")


class PeerCollector:
    """A prometheus_client collector over a running PeerServer (see peer/server.py)."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        server, handler, registry = self.server, self.server.handler, self.server.registry
        if handler is None:  # still choosing its span: nothing served yet
            return
        yield InfoMetricFamily("molink_peer", "who this peer is and what it serves",
                               value={"peer_id": handler.host.get_id().to_base58(), "model_key": server.model_key,
                                      "version": _version()})
        gauges = {
            "blocks_start": (handler.span.start, "first block served"),
            "blocks_end": (handler.span.end, "one past the last block served"),
            "throughput_block_steps_per_second": (server.throughput, "measured speed (batch 1, one token)"),
            "sessions_open": (len(registry), "inference sessions open now"),
            "cache_tokens_budget": (registry.budget_tokens, "KV-cache budget, tokens per block"),
            "cache_tokens_used": (registry.reserved_tokens, "KV-cache tokens reserved by open sessions"),
            "cache_tokens_free": (registry.free_tokens, "KV-cache tokens new sessions can still reserve"),
            "leaving": (int(handler.leaving), "1 while the peer withdraws and drains"),
        }
        # The step queue belongs to the scheduler (peer/scheduler.py); read defensively: without
        # batching, or should its internals change, the metric is simply absent.
        queue = getattr(handler.scheduler, "_queue", None)
        if isinstance(queue, list):
            gauges["queue_steps"] = (len(queue), "steps waiting for a forward")
        for name, (value, doc) in gauges.items():
            yield GaugeMetricFamily(f"molink_peer_{name}", doc, value=value)
        stats = handler.stats
        for name, value, doc in (("sessions_opened", stats.sessions_opened, "sessions opened since start"),
                                 ("steps", stats.steps, "inference steps served"),
                                 ("tokens", stats.tokens, "tokens processed (rows x new tokens per step)"),
                                 ("errors", stats.errors, "steps answered with an error")):
            yield CounterMetricFamily(f"molink_peer_{name}", doc, value=value)
        if handler.scheduler is not None:
            for name, value in handler.scheduler.stats.as_dict().items():
                if isinstance(value, (int, float)):
                    yield GaugeMetricFamily(f"molink_peer_batching_{name}", f"continuous batching: {name}",
                                            value=value)


def _version() -> str:
    from molink.peer.server import VERSION

    return VERSION


def metrics_app(registry: CollectorRegistry):
    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] in ("/metrics", "/"):
            status, body, kind = 200, generate_latest(registry), CONTENT_TYPE_LATEST
        else:
            status, body, kind = 404, b"not found: try /metrics\n", "text/plain; charset=utf-8"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind.encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


async def serve_metrics(server, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics until cancelled; nursery.start() it (it reports the bound URL)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    registry = CollectorRegistry(auto_describe=False)  # per peer: several peers may share a process
    registry.register(PeerCollector(server))
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, metrics_app(registry), config)
        url = f"{binds[0]}/metrics" if binds else f"http://{host}:{port}/metrics"
        logger.info("metrics at %s", url)
        task_status.started(url)
