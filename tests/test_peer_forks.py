"""The fork server behind the suite's LocalSwarm peers: real processes with Popen's semantics."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from molink.swarm.peer_forks import ORPHAN_EXIT_CODE, PeerForkServer


def spawn(tmp_path, name: str, argv: list[str], **env):
    log = tmp_path / f"{name}.log"
    return PeerForkServer.shared().spawn(argv, {**os.environ, **env}, str(log)), log


def test_a_forked_command_runs_with_its_own_arguments_log_and_exit_code(tmp_path):
    process, log = spawn(tmp_path, "identity", ["identity", "--identity", str(tmp_path / "key")])
    assert process.wait(30) == 0
    assert process.pid != os.getpid()
    assert log.read_text().strip().startswith("12D3KooW")  # the peer id, printed by the child
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    bad, log = spawn(tmp_path, "bad", ["join", "--blocks", "nonsense"])
    assert bad.wait(30) == 2  # argparse's usage error, as from `python -m molink.peer.cli`
    assert "blocks must look like A:B" in log.read_text()


def test_a_forked_bootstrap_is_a_live_process_until_signalled(tmp_path):
    ready = tmp_path / "bootstrap.addr"
    process, log = spawn(tmp_path, "bootstrap", ["bootstrap", "--ready-file", str(ready)])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(0.2)
    assert "/p2p/12D3KooW" in ready.read_text()
    process.terminate()  # SIGTERM: leaves cleanly, exit 0
    assert process.wait(15) == 0
    again, _ = spawn(tmp_path, "bootstrap2", ["bootstrap"])
    time.sleep(0.5)
    again.send_signal(signal.SIGKILL)
    assert again.wait(15) == -signal.SIGKILL
    assert again.poll() == -signal.SIGKILL


def test_peers_outlive_a_dead_fork_server_and_can_still_be_stopped(tmp_path):
    server = PeerForkServer()  # a private one: this test kills it
    ready = tmp_path / "bootstrap.addr"
    process = server.spawn(["bootstrap", "--ready-file", str(ready)], dict(os.environ), str(tmp_path / "b.log"))
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.process.kill()
    server.process.wait(10)
    assert process.poll() is None  # the peer lives on, an orphan
    process.kill()
    assert process.wait(15) == ORPHAN_EXIT_CODE  # gone; its exit code went with the server
