"""Which machine a peer computes on, as an opaque id its span records carry (`machine`, with the
number of forwards it runs side by side, `machine_cores`).

Several peers can share one machine (a volunteer with one big CPU, the local demo, the WAN test
bed): while one computes a prompt chunk the others' chunks compete for the same cores, and a
client that plans as if each had its own would over-value pipelining (swarm/pipeline_cost.py).
The id is a keyed hash of the OS's machine id and the compute device, keyed by the model's DHT key:
peers of one machine match within a model's swarm, and nothing links a machine across swarms or
reveals its OS id. Peers on separate GPUs of one machine get separate ids (they do not compete).
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from functools import lru_cache

MACHINE_ID_HEX = 16  # 64 bits: peers of a swarm's machines never collide by chance
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


@lru_cache(maxsize=1)
def _os_machine_id() -> bytes:
    for path in MACHINE_ID_FILES:
        try:
            with open(path, "rb") as f:
                value = f.read().strip()
            if value:
                return value
        except OSError:
            continue
    return f"{socket.gethostname()}/{uuid.getnode():x}".encode()  # macOS, Windows, containers without one


@lru_cache(maxsize=64)
def machine_id(model_key: str, device: str = "cpu") -> str:
    """This machine's id for `device` ("cpu", "cuda:1", ...) in the swarm of `model_key`."""
    digest = hashlib.blake2b(_os_machine_id() + b"\0" + device.encode(), key=model_key.encode()[:64],
                             digest_size=MACHINE_ID_HEX // 2)
    return digest.hexdigest()


def machine_cores(device: str = "cpu") -> int:
    """Forwards the device runs side by side: a CPU's cores (those this process may use), one GPU."""
    if device.split(":")[0] != "cpu":
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_name(device: str) -> str:
    """"cuda" means its first GPU: peers started with "cuda" and "cuda:0" share one."""
    kind, _, index = device.partition(":")
    return f"{kind}:{index or 0}" if kind != "cpu" else "cpu"
