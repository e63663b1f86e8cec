"""Which announced peers are really alive.

A peer that was SIGKILLed (or lost power, or its router died) cannot withdraw: its signed record
stays in the DHT until it expires (RECORD_TTL, 2 minutes). A peer deciding where to serve from the
DHT alone would see that span as covered and leave a hole open for that long. So before choosing
or moving, a peer asks the peers whose death could open a hole — those covering some block that
fewer than PROBE_BELOW_COVERAGE peers serve — for their INFO, with a short deadline, and treats
silence as death. Answers are cached briefly, so a swarm's worth of peers checking every few
seconds sends each of those peers a handful of tiny requests, not a storm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

from molink.dht.host import connect_peer, with_peer_id
from molink.dht.records import SpanRecord
from molink.dht.streams import STREAM_ERRORS, dial_framed
from molink.dht.wire import Frame
from molink.peer import protocol as p

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0  # connect + INFO round trip; a frozen peer never completes Noise
CACHE_SECONDS = 10.0
PROBE_BELOW_COVERAGE = 3  # probe the servers of blocks that fewer than this many peers serve
MAX_PROBES = 16


@dataclass(frozen=True)
class InfoAnswer:
    body: dict
    rtt: float  # seconds for the request alone: the connection is made before the clock starts


async def ask_info(host, record: SpanRecord, timeout: float = PROBE_TIMEOUT) -> InfoAnswer | None:
    """The peer's INFO answer and its round trip, or None when it does not answer within `timeout`."""
    try:
        with trio.fail_after(timeout):
            await connect_peer(host, with_peer_id(record.addrs, record.peer_id), timeout=timeout)
            async with dial_framed(host, ID.from_base58(record.peer_id), p.INFO_PROTOCOL,
                                   open_timeout=timeout) as framed:
                started = trio.current_time()
                reply = await framed.request(Frame(p.INFO, 1, {}), timeout=timeout)
                rtt = trio.current_time() - started
    except trio.TooSlowError:
        logger.debug("peer %s did not answer INFO within %.0f s", record.peer_id, timeout)
        return None
    except Exception as exc:  # ConnectError, stream errors, a bad peer id: all mean "no answer"
        logger.debug("peer %s did not answer INFO: %s", record.peer_id, exc)
        return None
    return InfoAnswer(reply.body, rtt) if reply.type == p.INFO else None


class LivenessProbe:
    def __init__(self, host, own_peer_id: str):
        self.host = host
        self.own_peer_id = own_peer_id
        self._answers: dict[str, tuple[float, bool]] = {}  # peer id -> (when, alive)

    async def live_records(self, records: Sequence[SpanRecord], num_blocks: int) -> list[SpanRecord]:
        """`records` minus the peers that do not answer, among those whose death could open a hole."""
        suspects = self._peers_to_probe(records, num_blocks)
        now = trio.current_time()
        fresh = {pid for pid in suspects if pid in self._answers and now - self._answers[pid][0] < CACHE_SECONDS}
        by_id = {r.peer_id: r for r in records}
        async with trio.open_nursery() as nursery:
            for peer_id in suspects - fresh:
                nursery.start_soon(self._probe, by_id[peer_id])
        dead = {pid for pid in suspects if not self._answers.get(pid, (0.0, True))[1]}
        if dead:
            logger.info("ignoring %d announced peer(s) that do not answer: %s", len(dead),
                        ", ".join(sorted(pid[-8:] for pid in dead)))
        return [r for r in records if r.peer_id not in dead]

    def _peers_to_probe(self, records: Sequence[SpanRecord], num_blocks: int) -> set[str]:
        others = [r for r in records if r.peer_id != self.own_peer_id]
        servers: list[set[str]] = [set() for _ in range(num_blocks)]
        for r in others:
            for block in range(max(r.start, 0), min(r.end, num_blocks)):
                servers[block].add(r.peer_id)
        thin = sorted((len(s), sorted(s)) for s in servers if 0 < len(s) < PROBE_BELOW_COVERAGE)
        chosen: set[str] = set()
        for _, peer_ids in thin:  # the thinnest blocks first
            for peer_id in peer_ids:
                if len(chosen) < MAX_PROBES:
                    chosen.add(peer_id)
        return chosen

    async def _probe(self, record: SpanRecord) -> None:
        alive = await ask_info(self.host, record) is not None
        self._answers[record.peer_id] = (trio.current_time(), alive)
