"""The console scripts exist and describe their subcommands."""

import os
import stat
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=120)


def test_molink_swarm_help_lists_demo():
    out = run("molink-swarm", "--help")
    assert out.returncode == 0 and "demo" in out.stdout


def test_molink_peer_identity_creates_a_0600_key_and_prints_the_peer_id(tmp_path):
    key = tmp_path / "id.key"
    first = run("molink-peer", "identity", "--identity", str(key))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().startswith("12D3KooW")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert run("molink-peer", "identity", "--identity", str(key)).stdout == first.stdout
    os.chmod(key, 0o640)
    refused = run("molink-peer", "identity", "--identity", str(key))
    assert refused.returncode == 2 and "chmod 600" in refused.stderr
