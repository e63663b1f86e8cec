"""Swarm keys: the shared secret of a private swarm (`--swarm-key FILE` on every command).

Every member of a private swarm holds the same 32 random bytes. The file uses the text format of
libp2p's private networks (what `ipfs-swarm-key-gen` writes), so the format is familiar and
diffable:

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>

`molink-peer make-swarm-key FILE` writes a fresh one (mode 0600, never over an existing file).
Loading checks the file's mode (like identity keys: a key others can read lets them in), the
header lines and the hex payload, and says which of them is wrong. How the key is used on the
wire is in molink.dht.private_swarm.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

SWARM_KEY_BYTES = 32
HEADER = "/key/swarm/psk/1.0.0/"
ENCODING = "/base16/"
KEY_FILE_MODE = 0o600
MAX_FILE_BYTES = 4096  # the format is ~100 bytes; refuse to slurp a wrong path's huge file


class SwarmKeyError(Exception):
    """The swarm key file is missing, unsafe or malformed (the message says which and how to fix it)."""


@dataclass(frozen=True)
class SwarmKey:
    secret: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != SWARM_KEY_BYTES:
            raise SwarmKeyError(f"a swarm key is exactly {SWARM_KEY_BYTES} bytes")

    @classmethod
    def generate(cls) -> "SwarmKey":
        return cls(os.urandom(SWARM_KEY_BYTES))

    @property
    def fingerprint(self) -> str:
        """Short, non-secret name for logs: members compare it to see they hold the same key."""
        return hashlib.sha256(b"molink swarm key fingerprint\0" + self.secret).hexdigest()[:16]

    def to_text(self) -> str:
        return f"{HEADER}\n{ENCODING}\n{self.secret.hex()}\n"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"SwarmKey(fingerprint={self.fingerprint})"


def parse_swarm_key(text: str, source: str = "swarm key") -> SwarmKey:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 3:
        raise SwarmKeyError(f"{source}: expected 3 lines ({HEADER!r}, {ENCODING!r}, 64 hex digits), "
                            f"got {len(lines)}")
    if lines[0] != HEADER:
        raise SwarmKeyError(f"{source}: first line must be {HEADER!r}, got {lines[0][:40]!r}")
    if lines[1] != ENCODING:
        raise SwarmKeyError(f"{source}: only the {ENCODING!r} encoding is supported, got {lines[1][:40]!r}")
    payload = lines[2]
    if len(payload) != 2 * SWARM_KEY_BYTES:
        raise SwarmKeyError(f"{source}: the key must be {2 * SWARM_KEY_BYTES} hex digits, got {len(payload)}")
    try:
        secret = bytes.fromhex(payload)
    except ValueError:
        raise SwarmKeyError(f"{source}: the key line is not hexadecimal") from None
    return SwarmKey(secret)


def load_swarm_key(path: str | os.PathLike) -> SwarmKey:
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SwarmKeyError(f"swarm key file {path} does not exist (make one with: "
                            f"molink-peer make-swarm-key {path})") from None
    except OSError as exc:
        raise SwarmKeyError(f"swarm key file {path}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise SwarmKeyError(f"swarm key file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SwarmKeyError(f"swarm key file {path} is readable by others (mode {mode:04o}); anyone who "
                            f"reads it can join the swarm. Fix it with: chmod 600 {path}")
    if info.st_size > MAX_FILE_BYTES:
        raise SwarmKeyError(f"swarm key file {path} is {info.st_size} bytes: not a swarm key")
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SwarmKeyError(f"swarm key file {path} is unreadable: {exc}") from exc
    return parse_swarm_key(text, f"swarm key file {path}")


def write_swarm_key(key: SwarmKey, path: str | os.PathLike) -> None:
    """Create `path` with mode 0600 from the first byte; an existing file is never replaced
    (overwriting a swarm's key by mistake would cut this member off from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        raise SwarmKeyError(f"{path} already exists; refusing to replace a swarm key") from None
    try:
        os.fchmod(fd, KEY_FILE_MODE)
        os.write(fd, key.to_text().encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def swarm_key_from(value: "SwarmKey | str | os.PathLike | None") -> SwarmKey | None:
    """What APIs accept as `swarm_key=`: a SwarmKey, a key file path, or None (public swarm)."""
    if value is None or isinstance(value, SwarmKey):
        return value
    return load_swarm_key(value)
