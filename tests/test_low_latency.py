"""`--low-latency`: a CPU wake-up latency bound held through Linux PM QoS while a process serves.

- Where the machine lets us (root, /dev/cpu_dma_latency), the bound is in force while held and the
  previous one is back once released.
- Where it does not, the process goes on without it and says why; nothing raises.
- `molink-peer join --low-latency` and MOLINK_LOW_LATENCY=1 both ask for it.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest

from molink.peer import cli
from molink.peer.low_latency import PM_QOS_DEVICE, cpu_latency_bound, current_bound_us

can_hold = os.geteuid() == 0 and os.path.exists(PM_QOS_DEVICE)


@pytest.mark.skipif(not can_hold, reason=f"needs root and {PM_QOS_DEVICE}")
def test_the_bound_holds_while_held_and_is_released_after():
    before = current_bound_us()
    with cpu_latency_bound(0) as hold:
        assert hold.held and "0 us" in hold.detail
        assert current_bound_us() == 0
    assert current_bound_us() == before


def test_a_machine_that_cannot_runs_without_it_and_says_why(tmp_path, caplog):
    missing = tmp_path / "no-such-device"
    with cpu_latency_bound(0, device=str(missing)) as hold:
        assert not hold
        assert str(missing) in hold.detail
    assert "running without it" in caplog.text
    assert current_bound_us(str(missing)) is None
    with pytest.raises(ValueError):
        with cpu_latency_bound(-1):
            pass


def test_join_asks_for_it_by_flag_or_environment(monkeypatch):
    parser = cli.build_parser()
    base = ["join", "--model", "m", "--initial-peers", "/ip4/127.0.0.1/tcp/1"]
    monkeypatch.delenv("MOLINK_LOW_LATENCY", raising=False)
    assert isinstance(cli._low_latency(parser.parse_args(base)), nullcontext)
    assert not isinstance(cli._low_latency(parser.parse_args([*base, "--low-latency"])), nullcontext)
    monkeypatch.setenv("MOLINK_LOW_LATENCY", "1")
    assert not isinstance(cli._low_latency(parser.parse_args(base)), nullcontext)
