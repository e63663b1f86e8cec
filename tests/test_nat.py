"""Volunteers behind home routers (scripts/nat_bed.py): nftables NATs in network namespaces.

- quick: the bed itself: a home reaches the internet, nothing unsolicited reaches a home, a TCP
  simultaneous open between two homes works through cone NATs and fails through symmetric ones,
  the same with a 20 ms WAN delay (RTT home -> public ~ 40 ms), and closing the bed leaves
  nothing behind;
- slow: bootstrap/relay nodes on the internet, two peers each behind its own NAT, a client behind
  a third: greedy generation gives transformers' tokens, through hole-punched direct channels
  (cone) or relays (symmetric); each run reports how its data channels ended up;
- slow: the relay carrying a generation is killed mid-way: the NATed peer moves to another relay
  and re-announces, the client fails over, the tokens are still exact.
All need root, `ip` and `nft` (scripts/setup_env.sh installs nftables as root), and skip otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from nat_bed import PREFIX, NatBed, probe  # noqa: E402
from tests.netns import namespaces_unavailable, our_namespaces as namespaces_in_use  # noqa: E402


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the NAT bed needs root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the NAT bed needs `{tool}` (apt-get install {'iproute2' if tool == 'ip' else 'nftables'})"
    return namespaces_unavailable(PREFIX)


REASON = _unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def our_namespaces() -> list[str]:
    return namespaces_in_use(PREFIX)


@pytest.mark.parametrize("nat, punches, delay_ms", [("cone", True, None), ("symmetric", False, None),
                                                    ("cone", True, 20.0)])
def test_bed_nat_behaviour_and_cleanup(nat, punches, delay_ms):
    with NatBed(["boot"], ["a", "b"], nat=nat, delay_ms=delay_ms) as bed:
        # (hub,) boot, and a router + a host per home; the shaped bed's internet is a forwarder, not a hub
        assert len(our_namespaces()) == (0 if delay_ms else 1) + 1 + 2 * 2
        result = probe(bed)
    assert result["outbound"] == "ok", result
    assert result["unsolicited_inbound"].startswith("fail timed out"), result  # dropped, not refused
    assert (result["punch"] == ["ok", "ok"]) is punches, result
    if delay_ms:  # home -> public and back: one crossing each way
        assert 2 * delay_ms <= result["rtt_ms"]["median"] < 2 * delay_ms + 10, result
    assert our_namespaces() == []


# ---------------------------------------------------------------------- a swarm behind NATs


def expected_tokens(model_dir, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([prompt])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(False)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("nat, path", [("cone", "punched"), ("symmetric", "relayed")])
def test_generation_through_two_nated_peers(tiny_llama, tmp_path, nat, path, record_property):
    from nat_swarm import data_path_of, run_nat_client, start_nat_swarm

    new_tokens = 10
    with NatBed(["boot", "relay2"], ["p0", "p1", "client"], nat=nat) as bed:
        boots = start_nat_swarm(bed, tiny_llama, [(0, 3), (3, 6)], tmp_path / "swarm")
        result = run_nat_client(bed, {"model_dir": str(tiny_llama), "initial_peers": boots,
                                      "new_tokens": new_tokens, "runs": 2})
        p0_log = (tmp_path / "swarm" / "p0.log").read_text()
    assert our_namespaces() == []
    expected = expected_tokens(tiny_llama, result["prompt"], new_tokens)
    report = []
    for run in result["runs"]:
        assert run["tokens"] == expected
        report.append({"client->peers": run["hops"], "p0->p1": data_path_of(p0_log)})
    print(f"\n[nat={nat}] data channels per run: {report}")
    record_property("data_channels", report)
    assert "reachability private" in p0_log and "reserved a relay slot" in p0_log
    for run in report:
        assert run["client->peers"] == [path, path] and run["p0->p1"] == path


@pytest.mark.slow
def test_relay_leaving_mid_generation_is_survived(tiny_llama, tmp_path):
    from nat_swarm import run_nat_client, start_nat_swarm

    new_tokens = 16
    # symmetric NATs: everything stays relayed, so the relay's death really cuts the session
    with NatBed(["boot", "relay2", "relay3"], ["p0", "p1", "client"], nat="symmetric") as bed:
        boots = start_nat_swarm(bed, tiny_llama, [(0, 3), (3, 6)], tmp_path / "swarm")
        # the peers reserve on the first two candidates; the client's circuits go through the first
        result = run_nat_client(bed, {"model_dir": str(tiny_llama), "initial_peers": boots, "new_tokens": new_tokens,
                                      "kill_after": 4}, on_kill=bed.roles["boot"].kill)
        logs = {host: (tmp_path / "swarm" / f"{host}.log").read_text() for host in ("p0", "p1")}
    assert our_namespaces() == []
    [run] = result["runs"]
    assert run["tokens"] == expected_tokens(tiny_llama, result["prompt"], new_tokens)
    assert run["recoveries"] and all(r["seconds"] < 20 for r in run["recoveries"]), run["recoveries"]
    for log in logs.values():  # each NATed peer noticed, found a third relay and re-announced
        assert "is gone; looking for another" in log and "re-announced at" in log
    print(f"\nrelay killed after 4 tokens; recoveries: {run['recoveries']}")
