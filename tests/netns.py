"""What the WAN and NAT bed tests share: can we make namespaces here, and which are ours."""

from __future__ import annotations

import os
import subprocess


def namespaces_unavailable(prefix: str) -> str | None:
    """Why this process cannot create network namespaces, or None when it can (tried for real)."""
    probe = f"{prefix}{os.getpid()}-canary"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def our_namespaces(prefix: str) -> list[str]:
    """Namespaces this test process made (named prefix + pid + '-')."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"{prefix}{os.getpid()}-")]
