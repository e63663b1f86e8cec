"""Start peer processes in a fraction of a second: fork them from a process that has imported them.

A `molink-peer` process spends ~4.5 s of CPU importing torch, transformers and libp2p before it
loads a single weight; a test suite that starts ~60 peers on 2 cores pays minutes for it. The fork
server imports all that once (and runs nothing: no trio loop, no torch op, no thread, so a fork is
safe), then forks one child per request. Each child is a real, separate peer process: it sets the
environment it was given, sends stdout/stderr to its log file and runs `molink.peer.cli.main` with
its arguments, exactly what `python -m molink.peer.cli ...` runs after its imports.

The server is the children's parent: it reaps them and reports each exit code on its stdout, so
`ForkedPeer` offers the part of `subprocess.Popen` that LocalSwarm uses (pid, poll, wait,
send_signal, terminate, kill, returncode). Opt-in with MOLINK_FORK_PEERS=1 (the test suite sets it);
the demo and the benchmarks start peers the plain way. What a fork shares with its siblings: the
module state the imports left (the child reseeds `random`) and the interpreter's str hash seed, fine
for tests, one more reason volunteers start peers the plain way.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

FORK_PEERS_ENV = "MOLINK_FORK_PEERS"
REAP_INTERVAL = 0.05  # seconds between the server's waitpid sweeps when no request comes
ORPHAN_EXIT_CODE = -255  # a peer that outlived the fork server: gone, with its exit code unknown


def fork_peers_enabled() -> bool:
    return os.environ.get(FORK_PEERS_ENV, "0").lower() in ("1", "on", "true", "yes")


class ForkedPeer:
    """The Popen subset LocalSwarm uses, for a peer forked by the server."""

    def __init__(self, server: "PeerForkServer", pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"peer pid {self.pid}", timeout)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class PeerForkServer:
    """The client side: one server process per test process, started on first use."""

    _shared: "PeerForkServer | None" = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "PeerForkServer":
        with cls._shared_lock:
            if cls._shared is None or cls._shared.process.poll() is not None:
                cls._shared = cls()
            return cls._shared

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "molink.swarm.peer_forks"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self._exits: dict[int, int] = {}
        self._pids: list[int] = []
        self._changed = threading.Condition()
        self._request_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="peer-fork-server", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self._changed:
                if "exit" in message:
                    self._exits[message["exit"]] = message["code"]
                elif "pid" in message:
                    self._pids.append(message["pid"])
                self._changed.notify_all()
        with self._changed:  # the server is gone: nobody will report the children's exits
            self._changed.notify_all()

    def spawn(self, argv: list[str], env: dict[str, str], log_path: str, timeout: float = 30.0) -> ForkedPeer:
        with self._request_lock:
            self.process.stdin.write(json.dumps({"argv": argv, "env": env, "log": log_path}) + "\n")
            self.process.stdin.flush()
            with self._changed:
                if not self._changed.wait_for(lambda: self._pids or self.process.poll() is not None, timeout):
                    raise RuntimeError("the peer fork server did not answer")
                if not self._pids:
                    raise RuntimeError(f"the peer fork server exited with {self.process.returncode}")
                return ForkedPeer(self, self._pids.pop(0))

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            if pid in self._exits or self._reader.is_alive():
                return self._exits.get(pid)
        return _orphan_exit_code(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or not self._reader.is_alive(), timeout)
            if pid in self._exits or self._reader.is_alive():
                return self._exits.get(pid)
        while (code := _orphan_exit_code(pid)) is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return code


def _orphan_exit_code(pid: int) -> int | None:
    """The server died before its child: init reaps the child now, and its exit code is lost."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:  # a zombie nobody reaps (a PID 1 that does not) is gone too
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                return ORPHAN_EXIT_CODE
    except (ProcessLookupError, FileNotFoundError):
        return ORPHAN_EXIT_CODE
    except (PermissionError, OSError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------- the server process


def _run_child(request: dict) -> None:
    """In the forked child: become the peer the request describes; never returns."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        os.environ.clear()
        os.environ.update(request["env"])
        random.seed()  # a fork copies the server's state: peers must not share jitter and choices
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from molink.peer.cli import main

        code = main(request["argv"])
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def _reap(out) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        out.write(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


def serve() -> None:
    # What a peer imports before it does anything (peer/cli.py's join path and the model code).
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import molink.peer.cli  # noqa: F401
    import molink.peer.server  # noqa: F401

    if threading.active_count() != 1:  # a fork would copy a process with threads: not safe
        raise SystemExit(f"imports started {threading.active_count() - 1} thread(s); cannot fork peers")
    out = sys.stdout
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], REAP_INTERVAL)
        _reap(out)
        if not readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:  # our parent went away: the children it started are its to stop
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _run_child(request)
            out.write(json.dumps({"pid": pid}) + "\n")
            out.flush()

if __name__ == "__main__":
    serve()
