"""FailoverChain (swarm/failover.py) on its own, with a stand-in for the swarm: what the caller hears."""

from __future__ import annotations

import pytest
import torch
import trio

from molink.peer import protocol as p
from molink.swarm.failover import FailoverChain
from molink.swarm.inference_errors import InferenceError
from molink.swarm.routing import BanList, NoRouteError


async def test_a_route_that_fails_while_a_busy_peer_rests_says_busy_even_if_the_rest_ends_meanwhile():
    """The only peer said "busy" and rests (no strike). Planning without it fails, but takes longer
    than the rest lasts (a DHT lookup can take seconds): the caller must hear "busy", not "no route"
    (seen in CI: tests/test_swarm.py::test_request_over_every_budget_says_why)."""
    bans = BanList()
    bans.avoid("busy-peer", 0.05)
    plans = []

    async def open_session(banned: set[str]):
        plans.append(set(banned))
        await trio.sleep(0.1)  # the rest runs out while we plan
        raise NoRouteError("no route covers all 6 blocks (1 peer(s) banned)")

    chain = FailoverChain(open_session, bans, recovery_timeout=0.0)
    with pytest.raises(InferenceError) as refused:
        await chain.step(torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.long))
    assert plans == [{"busy-peer"}] and not bans.resting()
    assert refused.value.code == p.BUSY and "busy" in str(refused.value), refused.value
