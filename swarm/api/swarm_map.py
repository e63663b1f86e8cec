"""`/api/swarm`: who serves which blocks right now, as JSON for the swarm map page.

Two sources, merged per peer: the signed span records in the DHT (span, announced throughput,
addresses, expiry) and each peer's INFO answer (open sessions, steps served, free cache), asked
live so the map shows load as it changes rather than as of the last 30 s re-announce. Latency is
the client's own heartbeat round trip to the peer where it has one, else the smallest round trip
the peer published to its next hops. A snapshot is shared for SNAPSHOT_SECONDS, so many open
map pages cost the swarm one lookup per interval, not one each.
"""

from __future__ import annotations

import time

import trio

from molink.dht.host import connect_peer, with_peer_id
from molink.dht.streams import dial_framed
from molink.dht.wire import Frame
from molink.peer import protocol as p
from molink.swarm.routing import coverage_gaps, is_relayed

SNAPSHOT_SECONDS = 1.5
LOOKUP_TIMEOUT = 5.0
INFO_TIMEOUT = 1.5
STALE_AFTER = 60.0  # seconds left on a 120 s record: it has missed a 30 s re-announce or two


class SwarmMap:
    def __init__(self, model, engine):
        self.model = model
        self.engine = engine
        self._lock = trio.Lock()
        self._snapshot: dict | None = None
        self._taken_at = -float("inf")

    async def snapshot(self) -> dict:
        async with self._lock:  # concurrent pollers wait for one lookup instead of each starting one
            if time.monotonic() - self._taken_at > SNAPSHOT_SECONDS:
                self._snapshot = await self._take()
                self._taken_at = time.monotonic()
            return self._snapshot

    async def _take(self) -> dict:
        records, error = [], None
        dht = getattr(self.model, "dht", None)
        if dht is None:
            error = "this model runs in-process: no swarm to show"
        else:
            with trio.move_on_after(LOOKUP_TIMEOUT) as scope:
                try:
                    records = await dht.find_spans(self.model.model_key)
                except Exception as exc:  # a flaky lookup shows as a message on the map, not a 500
                    error = f"DHT lookup failed: {exc}"
            if scope.cancelled_caught:
                error = f"DHT lookup took over {LOOKUP_TIMEOUT:.0f} s"
        infos = await self._infos(records) if records else {}
        return {"updated_at": time.time(), "error": error, "models": [self._model_entry(records, infos)],
                "api": {"active_requests": self.engine.active, "max_concurrent": self.engine.limits.max_concurrent,
                        **self.engine.stats}}

    async def _infos(self, records) -> dict[str, dict]:
        infos: dict[str, dict] = {}

        async def ask(record) -> None:
            with trio.move_on_after(INFO_TIMEOUT):
                try:
                    peer_id = await connect_peer(self.model.host, with_peer_id(record.addrs, record.peer_id),
                                                 timeout=INFO_TIMEOUT)
                    async with dial_framed(self.model.host, peer_id, p.INFO_PROTOCOL,
                                           open_timeout=INFO_TIMEOUT) as framed:
                        reply = await framed.request(Frame(p.INFO, 1, {}), timeout=INFO_TIMEOUT)
                    infos[record.peer_id] = reply.body
                except Exception:  # no answer (timeout, reset, refusal) is itself what the map shows
                    pass

        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(ask, record)
        return infos

    def _model_entry(self, records, infos: dict[str, dict]) -> dict:
        num_blocks = self.model.config.num_hidden_layers
        blocks = [{"index": i, "peers": [], "throughput": 0.0} for i in range(num_blocks)]
        for r in records:
            for i in range(max(0, r.start), min(num_blocks, r.end)):
                blocks[i]["peers"].append(r.peer_id)
                blocks[i]["throughput"] += r.throughput
        gaps = coverage_gaps(records, num_blocks)
        return {"id": self.engine.model_id, "model_key": getattr(self.model, "model_key", None),
                "num_blocks": num_blocks, "covered": not gaps and bool(records),
                "gaps": [list(g) for g in gaps], "blocks": blocks,
                "peers": [self._peer_entry(r, infos.get(r.peer_id)) for r in sorted(records, key=lambda r: r.start)]}

    def _peer_entry(self, record, info: dict | None) -> dict:
        now = time.time()
        bans = getattr(self.model, "bans", None)
        banned = bans.banned() if bans is not None else set()
        liars = bans.liars if bans is not None else set()
        own_rtt = getattr(self.model, "rtts", {}).get(record.peer_id)
        published = list(record.next_rtt_map.values())
        latency = own_rtt if own_rtt is not None else (min(published) if published else None)
        if record.peer_id in liars:
            state = "caught lying"  # a spot check proved it (swarm/spot_check.py): shown to every visitor
        elif record.peer_id in banned:
            state = "banned"  # failed one of our sessions recently (swarm/failover.py)
        elif info is None:
            state = "no answer"
        elif record.expires_at - now < STALE_AFTER:
            state = "stale"
        elif (info.get("free_cache_tokens") or 0) <= 0:
            state = "full"
        else:
            state = "serving"
        return {"peer_id": record.peer_id, "short": record.peer_id[-8:], "start": record.start, "end": record.end,
                "throughput": round(record.throughput, 1), "latency_ms": None if latency is None else
                round(1000 * latency, 2), "latency_source": "client" if own_rtt is not None else
                ("peer" if published else None), "state": state,
                "reachability": "relayed" if is_relayed(record) else "direct", "addrs": list(record.addrs),
                "dialback": record.reachability,  # public | private | unknown (dht/reachability.py)
                "sessions": info.get("sessions") if info else record.sessions,
                "steps": info.get("steps") if info else None,
                "free_cache_tokens": info.get("free_cache_tokens") if info else record.free_cache_tokens,
                "version": record.version, "expires_in": round(record.expires_at - now, 1)}
