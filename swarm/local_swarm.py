"""A swarm of real peer processes on 127.0.0.1: for the demo, the tests and the benchmarks.

`LocalSwarm` starts a bootstrap node and one `molink-peer join` process per span, waits for each
ready file (written atomically once the peer serves and has announced), and stops exactly the
processes it started, by pid: SIGTERM first (peers withdraw and exit 0), SIGKILL if they linger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from molink.swarm.peer_forks import PeerForkServer, fork_peers_enabled

READY_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0


class SwarmStartError(RuntimeError):
    pass


@dataclass
class PeerProcess:
    name: str
    process: subprocess.Popen  # or a ForkedPeer (swarm/peer_forks.py): the same calls
    ready_file: Path
    log_file: Path
    blocks: tuple[int, int] | None = None
    address: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalSwarm:
    def __init__(self, model_dir: str | Path, spans: list[tuple[int, int]], *, workdir: str | Path | None = None,
                 torch_threads: int = 1, extra_args: list[str] | None = None, env: dict | None = None,
                 swarm_key: str | Path | None = None):
        self.model_dir = str(model_dir)
        self.spans = spans
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="molink-swarm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.torch_threads = torch_threads
        self.extra_args = extra_args or []
        self.env = env or {}
        # a private swarm: every process (bootstrap and peers) gets --swarm-key with this file
        self.swarm_key = None if swarm_key is None else str(swarm_key)
        self.bootstrap: PeerProcess | None = None
        self.peers: list[PeerProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return [self.bootstrap.address] if self.bootstrap and self.bootstrap.address else []

    def _spawn(self, name: str, args: list[str], blocks=None, extra_env: dict | None = None) -> PeerProcess:
        ready = self.workdir / f"{name}.addr"
        log = self.workdir / f"{name}.log"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.torch_threads), "PYTHONUNBUFFERED": "1",
               **self.env, **(extra_env or {})}
        key_args = ["--swarm-key", self.swarm_key] if self.swarm_key else []
        argv = [*args, *key_args, "--ready-file", str(ready)]
        if fork_peers_enabled():  # the test suite: forked from a process that has imported everything
            return PeerProcess(name, PeerForkServer.shared().spawn(argv, env, str(log)), ready, log, blocks)
        with open(log, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "molink.peer.cli", *argv],
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return PeerProcess(name, process, ready, log, blocks)

    def _wait_ready(self, peer: PeerProcess, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if peer.ready_file.exists():
                peer.address = peer.ready_file.read_text().strip()
                return peer.address
            if peer.process.poll() is not None:
                raise SwarmStartError(f"{peer.name} exited with {peer.process.returncode}:\n{peer.log_tail()}")
            time.sleep(0.05)
        raise SwarmStartError(f"{peer.name} not ready after {timeout:.0f} s:\n{peer.log_tail()}")

    def start(self, progress=None) -> "LocalSwarm":
        try:
            self.bootstrap = self._spawn("bootstrap", ["bootstrap"])
            self._wait_ready(self.bootstrap)
            for index, span in enumerate(self.spans):
                self.add_peer(span, name=f"peer{index}", wait=False)
            for peer in self.peers:
                self._wait_ready(peer)
                if progress:
                    progress(peer)
        except BaseException:
            self.stop()
            raise
        return self

    def add_peer(self, blocks: tuple[int, int] | None, name: str | None = None, wait: bool = True,
                 extra_args: list[str] | None = None, extra_env: dict | None = None) -> PeerProcess:
        """Start one more peer; blocks=None lets it choose its span (and rebalance) by itself."""
        name = name or f"peer{len(self.peers)}"
        span_args = ["--blocks", f"{blocks[0]}:{blocks[1]}"] if blocks is not None else []
        args = ["join", "--model", self.model_dir, *span_args,
                "--initial-peers", *self.initial_peers, *self.extra_args, *(extra_args or [])]
        peer = self._spawn(name, args, blocks, extra_env)
        self.peers.append(peer)
        if wait:
            self._wait_ready(peer)
        return peer

    def wait_ready(self, *peers: PeerProcess) -> None:
        """Wait for peers started with add_peer(wait=False): they load side by side meanwhile."""
        for peer in peers:
            self._wait_ready(peer)

    def kill(self, peer: PeerProcess, sig: int = signal.SIGKILL) -> None:
        if peer.process.poll() is None:
            peer.process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                peer.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                peer.process.kill()
                peer.process.wait()

    def stop(self) -> dict[str, int | None]:
        """Stop every process this swarm started; returns their exit codes."""
        everyone = [*self.peers, *([self.bootstrap] if self.bootstrap else [])]
        for peer in everyone:
            if peer.process.poll() is None:
                try:
                    peer.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                    peer.process.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for peer in everyone:
            try:
                peer.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                peer.process.kill()
                peer.process.wait()
        return {peer.name: peer.process.returncode for peer in everyone}

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
