"""A MoLink swarm on a NatBed (scripts/nat_bed.py), and the client work that runs inside its home.

`start_nat_swarm(bed, model_dir, spans, workdir)`: `molink-peer bootstrap` (also a relay) on every
public host (the first one bootstraps the others), one `molink-peer join --blocks A:B` per span on
the home hosts p0, p1, ... (each behind its router), every peer given all bootstrap nodes. Returns
the bootstrap multiaddrs. `env` reaches every process (e.g. MOLINK_HOLEPUNCH=0).

Inside the client's home (`run_nat_client(bed, cfg, on_kill)` starts `nat_swarm.py JSON` there):
a greedy generation through the swarm, timed per token; with `kill_after` it tells the owner after
that many tokens (the owner kills a relay: `on_kill()`), and the generation goes on. The result:
{"tokens", "step_ms", "paths": {peer: punched|relayed}, "hops": [transport per hop], "recoveries"}.
`data_path_of(log)` reads how a peer's push to the next one went from its log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from wan_swarm import Pipe, TimingStreamer, node_env, prompt_of, spawn_node, wait_ready  # noqa: E402


def start_nat_swarm(bed, model_dir, spans, workdir: Path, env: dict | None = None, threads: int = 1,
                    peer_args=()) -> list[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = node_env(threads, env)

    def spawn(host: str, args: list[str]):
        host, proc, ready = spawn_node(bed, workdir, host, args, full_env)
        bed.roles = {**getattr(bed, "roles", {}), host: proc}
        return host, proc, ready

    def wait(host, proc, ready) -> str:
        return wait_ready(workdir, host, proc, ready)

    boots = [wait(*spawn(bed.public[0], ["bootstrap"]))]
    boots += [wait(*spawn(host, ["bootstrap", "--initial-peers", boots[0]])) for host in bed.public[1:]]
    peers = [spawn(f"p{i}", ["join", "--model", str(model_dir), "--blocks", f"{a}:{b}", "--initial-peers",
                             *boots, *peer_args]) for i, (a, b) in enumerate(spans)]
    for peer in peers:
        wait(*peer)
    return boots


def data_path_of(log_text: str, peer_id: str | None = None) -> str | None:
    """From a peer's log: "punched", "relayed" or "direct" for its last data channel to peer_id."""
    found = None
    for line in log_text.splitlines():
        match = re.search(r"data channel to (\S+): (hole punched|relayed)", line)
        if match and (peer_id is None or match.group(1) == peer_id):
            found = "punched" if match.group(2) == "hole punched" else "relayed"
    return found


# ---------------------------------------------------------------------- inside the client's home
def client_main(cfg: dict) -> None:
    import inspect

    import torch

    torch.set_num_threads(cfg.get("threads", 1))
    from transformers.utils import logging as hf_logging

    from molink.dht.holepunch import transport_kind
    from molink.dht.holepunch import data_paths
    from molink.peer.checkpoint import load_config
    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.inference_session import RemoteSession

    hf_logging.set_verbosity_error()
    pipe = Pipe()
    hops: list[str] = []
    open_streams = RemoteSession._open_streams

    async def recording_open_streams(self, stack):  # fresh or warm from the pool (swarm/channel_pool.py)
        await open_streams(self, stack)
        hops.extend(transport_kind(framed.stream) for framed in self.streams)

    RemoteSession._open_streams = recording_open_streams
    vocab = load_config(cfg["model_dir"]).vocab_size
    prompt = prompt_of(cfg.get("prompt_tokens", 12), vocab)
    kill_after = cfg.get("kill_after")

    class Streamer(TimingStreamer):
        def put(self, value) -> None:
            super().put(value)
            if kill_after is not None and len(self.stamps) == kill_after + 1:
                pipe.send({"op": "kill"})  # the owner kills a relay; we do not wait for it

    result = {"runs": []}
    options = {}
    if "spot_check" in cfg and "spot_check" in inspect.signature(DistributedModelForCausalLM.from_pretrained).parameters:
        options["spot_check"] = cfg["spot_check"]  # benchmarks measure the transport alone
    with DistributedModelForCausalLM.from_pretrained(cfg["model_dir"], cfg["initial_peers"], **options) as model:
        model.generation_config.eos_token_id = None
        for run in range(cfg.get("runs", 1)):
            hops.clear()
            streamer = Streamer()
            out = model.generate(prompt, do_sample=False, max_new_tokens=cfg["new_tokens"], streamer=streamer)
            steps = [1000 * (b - a) for a, b in zip(streamer.stamps[2:], streamer.stamps[3:])]
            result["runs"].append({"tokens": out[0].tolist(), "step_ms": steps, "hops": list(hops),
                                   "route": [hop.peer_id for hop in model.last_route],
                                   "recoveries": [{k: v for k, v in r.items() if k in ("peer_id", "seconds", "error")}
                                                  for r in model.last_recoveries]})
            kill_after = None
        result["paths"] = dict(data_paths(model.host))
    pipe.send({"op": "result", "prompt": prompt[0].tolist(), **result})


def run_nat_client(bed, cfg: dict, on_kill=None, timeout: float = 900.0, env: dict | None = None) -> dict:
    proc = bed.run("client", [sys.executable, str(Path(__file__).resolve()), json.dumps(cfg)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(cfg.get("threads", 1)), **(env or {})})
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            message = json.loads(line)
            if message["op"] == "kill" and on_kill is not None:
                on_kill()
            elif message["op"] == "result":
                return message
        raise RuntimeError(f"client worker ended without a result (exit {proc.wait()})")
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


if __name__ == "__main__":
    client_main(json.loads(sys.argv[1]))
