"""Keep the CPUs out of deep idle while a process serves (Linux PM QoS, `--low-latency`).

Why: a decode step hops from process to process (client, peer, peer, ..., client) and each one
sleeps until its part arrives. A CPU with nothing to run enters an idle state, and leaving it is
not free: on the 2-core VMs here an idle vCPU halts, and the code that runs after the wake-up
runs from cold caches. Measured (decode_step_tensors, 15 us back to back): 35 us after a
0.2 ms sleep, 56 us after 1 ms, 232-255 us after 5 ms; with the CPUs kept polling, 66 us after
5 ms. In a whole swarm the gain is smaller than this host's noise on loopback (tiny model, 3 peers,
alternating rounds: 6.46 vs 6.64 ms/token) and ~6 ms of TTFT on the WAN bed (README).

Linux's PM QoS interface is the standard way to ask for that: write a 32-bit bound in
microseconds to /dev/cpu_dma_latency and keep the file open; the cpuidle governor then uses no
idle state that takes longer than the bound to leave (0: the CPUs poll instead of halting). It
is what tuned's latency-performance profile does. The request is dropped when the file closes,
so also when the process dies. The cost is power (an idle CPU spins), so it is opt-in, and
needs root (the device is 0600); without it the process runs as before and says why.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PM_QOS_DEVICE = "/dev/cpu_dma_latency"
LOW_LATENCY_ENV = "MOLINK_LOW_LATENCY"  # "1": peers started by scripts hold it (same as --low-latency)


@dataclass(frozen=True)
class LatencyHold:
    held: bool
    detail: str  # what a volunteer reads in the log

    def __bool__(self) -> bool:
        return self.held


def low_latency_from_env() -> bool:
    return os.environ.get(LOW_LATENCY_ENV, "0").lower() in ("1", "on", "true", "yes")


def current_bound_us(device: str = PM_QOS_DEVICE) -> int | None:
    """The bound in force now (every holder's together), or None where it cannot be read."""
    try:
        with open(device, "rb") as f:
            data = f.read(4)
    except OSError:
        return None
    return struct.unpack("i", data)[0] if len(data) == 4 else None


@contextmanager
def cpu_latency_bound(bound_us: int = 0, *, device: str = PM_QOS_DEVICE) -> Iterator[LatencyHold]:
    """Hold a CPU wake-up latency bound for the duration of the block; never raises for a
    machine that cannot (no device, no permission): yields a LatencyHold saying so."""
    if not 0 <= bound_us < 2**31:
        raise ValueError("the latency bound must be 0 <= microseconds < 2**31")
    try:
        fd = os.open(device, os.O_WRONLY)
    except OSError as exc:
        hint = " (needs root)" if isinstance(exc, PermissionError) else ""
        hold = LatencyHold(False, f"could not hold a CPU latency bound via {device}: {exc.strerror}{hint}")
        logger.warning("--low-latency: %s; running without it", hold.detail)
        yield hold
        return
    try:
        os.write(fd, struct.pack("i", bound_us))
        hold = LatencyHold(True, f"CPUs kept out of idle states slower than {bound_us} us to leave ({device})")
        logger.info("low latency: %s", hold.detail)
        yield hold
    finally:
        os.close(fd)  # the kernel drops the request with the file


@contextmanager
def low_latency_for_benchmark(enabled: bool) -> Iterator[dict]:
    """For a benchmark that starts peers: hold the bound here and have every child process started
    meanwhile hold its own (MOLINK_LOW_LATENCY=1), so its peers log what a volunteer's would.
    Yields what to record in the results (the machine setting is part of what was measured)."""
    if not enabled:
        yield {"low_latency": False, "cpu_latency_bound_us": current_bound_us()}
        return
    saved = os.environ.get(LOW_LATENCY_ENV)
    os.environ[LOW_LATENCY_ENV] = "1"
    try:
        with cpu_latency_bound(0) as hold:
            yield {"low_latency": hold.held, "detail": hold.detail, "cpu_latency_bound_us": current_bound_us()}
    finally:
        if saved is None:
            os.environ.pop(LOW_LATENCY_ENV, None)
        else:
            os.environ[LOW_LATENCY_ENV] = saved
