"""Cohorts on the client: concurrent generations' decode steps leave in a few even groups.

The gate only decides when a `steps` frame leaves and how many steps it carries (what a step
computes is the peers' business, checked against transformers in test_batching and
test_step_bundles); here the first hop is a stream that records the frames it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from molink.dht.streams import FramedStreamError
from molink.peer import protocol as p
from molink.swarm.cohorts import COHORT_WAIT_FRACTION, CohortGate
from molink.swarm.step_bundles import StepBundles

ROUND = 0.2  # seconds between a session's steps in these tests


@dataclass
class Hop:
    peer_id: str


@dataclass
class RecordingStream:
    frames: list = field(default_factory=list)
    broken: bool = False  # its connection died: every send fails as a real one would

    async def send(self, frame) -> None:
        if self.broken:
            raise FramedStreamError("stream reset")
        self.frames.append((trio.current_time(), frame))


class Session:
    """What StepBundles reads of a RemoteSession: its route, ids, shape and first-hop stream."""

    def __init__(self, index: int, stream: RecordingStream):
        self.route = [Hop("first"), Hop("last")]
        self.session_ids = [bytes([index]) * 8, bytes([index + 1]) * 8]
        self.batch_size, self.max_length, self.hidden_size = 1, 64, 8
        self.streams = [stream]
        self.is_open = True
        self.failed: list[Exception] = []

    def fail_hop(self, index, exc):
        self.failed.append(exc)


def sizes(stream: RecordingStream) -> list[int]:
    return [len(frame.body["items"]) if frame.type == p.STEPS else 1 for _, frame in stream.frames]


async def step_all(bundles: StepBundles, sessions, step: int) -> None:
    """Every session sends its decode step in the same moment (woken by one results frame)."""
    async with trio.open_nursery() as nursery:
        for session in sessions:
            nursery.start_soon(bundles.send, session, {"step": step})


async def warm_up(bundles, sessions) -> None:
    """Two rounds ROUND apart: the gate has seen every session decode and how often."""
    for step in range(2):
        await step_all(bundles, sessions, step)
        await trio.sleep(ROUND)


def setup(n: int, cohorts: int):
    stream = RecordingStream()
    sessions = [Session(2 * i, stream) for i in range(n)]
    bundles = StepBundles(CohortGate(lambda carrier, decoding: cohorts))
    for session in sessions:
        bundles.register(session)
    return stream, sessions, bundles


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_uneven_groups_are_evened_out(autojump_clock):
    stream, sessions, bundles = setup(32, cohorts=2)
    await warm_up(bundles, sessions)
    stream.frames.clear()
    async with trio.open_nursery() as nursery:  # 20 ready now, 12 a little later: 20 + 12 so far
        nursery.start_soon(step_all, bundles, sessions[:20], 2)
        await trio.sleep(0.01)
        nursery.start_soon(step_all, bundles, sessions[20:], 2)
    assert sizes(stream) == [16, 16]  # 16 left at once; 4 waited for the 12 and went with them
    (sent_first, _), (sent_second, _) = stream.frames
    assert sent_second - sent_first == pytest.approx(0.01, abs=1e-3)


async def test_a_group_short_of_its_share_waits_for_its_cohort_then_goes_anyway(autojump_clock):
    stream, sessions, bundles = setup(8, cohorts=2)
    await warm_up(bundles, sessions)
    stream.frames.clear()
    started = trio.current_time()
    await step_all(bundles, sessions[:3], 2)  # 3 of a share of 4: the fourth never comes
    assert sizes(stream) == [3]
    waited = stream.frames[0][0] - started
    assert waited == pytest.approx(COHORT_WAIT_FRACTION * ROUND, rel=0.05)
    assert bundles.cohorts.held >= 1


async def test_one_cohort_or_few_sessions_hold_nothing(autojump_clock):
    for n, cohorts in ((32, 1), (3, 2)):
        stream, sessions, bundles = setup(n, cohorts)
        await warm_up(bundles, sessions)
        stream.frames.clear()
        started = trio.current_time()
        await step_all(bundles, sessions[: n - 1], 2)
        assert sizes(stream) == [n - 1] and stream.frames[0][0] == started
        assert bundles.cohorts.held == 0


async def test_closed_sessions_stop_counting(autojump_clock):
    stream, sessions, bundles = setup(8, cohorts=2)
    await warm_up(bundles, sessions)
    for session in sessions[4:]:
        bundles.unregister(session)
    stream.frames.clear()
    started = trio.current_time()
    await step_all(bundles, sessions[:4], 2)  # 4 decoding: 2 cohorts of 2, nobody waits for the gone
    assert sizes(stream) == [2, 2] and all(at == started for at, _ in stream.frames)


def carried_sessions(stream: RecordingStream) -> list[bytes]:
    return [item["session_id"] for _, frame in stream.frames for item in frame.body.get("items", [frame.body])]


async def test_a_closed_or_broken_carrier_does_not_take_the_others_steps_down():
    shared = RecordingStream()
    sessions = [Session(2 * i, shared) for i in range(6)]
    sessions[0].is_open = False  # closed while the bundle waited (a cancel, a failover)
    sessions[1].streams = [RecordingStream(broken=True)]  # the next carrier's stream is dead
    bundles = StepBundles()
    for session in sessions:
        bundles.register(session)
    # in this order (which session carries depends on task order: StepBundles' own sending step)
    await bundles._send([(session, {"step": 0}) for session in sessions], hidden_size=8)
    assert sessions[0].failed and sessions[1].failed  # only their own steps fail
    assert all(not s.failed for s in sessions[2:])
    assert sorted(carried_sessions(shared)) == sorted(s.session_ids[0] for s in sessions[2:])


async def test_sessions_that_stopped_stepping_are_not_waited_for(autojump_clock):
    stream, sessions, bundles = setup(8, cohorts=2)
    await warm_up(bundles, sessions)
    await trio.sleep(4 * ROUND)  # half of them went quiet (finished their turn, a long prompt)
    stream.frames.clear()
    started = trio.current_time()
    await step_all(bundles, sessions[:4], 2)
    assert sizes(stream) == [2, 2] and all(at == started for at, _ in stream.frames)


async def test_a_failing_cohort_count_groups_nothing(autojump_clock):
    def broken(carrier, decoding):
        raise ValueError("no route costs")

    stream, sessions, bundles = setup(8, cohorts=2)
    bundles.cohorts.count = broken
    await warm_up(bundles, sessions)
    stream.frames.clear()
    await step_all(bundles, sessions[:5], 2)
    assert sizes(stream) == [5] and not any(s.failed for s in sessions)
