"""Ed25519 peer identities: created on first use, kept in a 0600 key file, loaded afterwards.

The key file holds the 32-byte Ed25519 seed as PKCS#8 PEM (readable by `openssl pkey`), written
through `cryptography`. The same seed gives the libp2p key pair, so a peer's libp2p id and the
key that signs its DHT records are one identity.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

KEY_FILE_MODE = 0o600


class IdentityFileError(Exception):
    """The identity key file is unsafe or unreadable."""


@dataclass(frozen=True)
class Identity:
    """One Ed25519 key: signs records and is the libp2p peer identity."""

    seed: bytes

    @classmethod
    def generate(cls) -> "Identity":
        key = Ed25519PrivateKey.generate()
        return cls(key.private_bytes_raw())

    @property
    def public_key(self) -> bytes:
        """Raw 32-byte Ed25519 public key."""
        return self._private_key().public_key().public_bytes_raw()

    @property
    def keypair(self) -> KeyPair:
        """The libp2p key pair built from the same seed."""
        return create_new_key_pair(self.seed)

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.keypair.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._private_key().sign(message)

    def _private_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def to_pem(self) -> bytes:
        return self._private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def peer_id_from_public_key(public_key: bytes) -> ID:
    """The libp2p peer id that a raw Ed25519 public key stands for."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey

    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


def _check_permissions(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityFileError(
            f"identity key file {path} is readable by others (mode {mode:04o}); "
            f"a stolen key lets anyone impersonate this peer. Fix it with: chmod 600 {path}"
        )


def load_identity(path: str | os.PathLike) -> Identity:
    path = Path(path)
    _check_permissions(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityFileError(f"identity key file {path} is not a PEM Ed25519 key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityFileError(f"identity key file {path} holds a {type(key).__name__}, not Ed25519")
    return Identity(key.private_bytes_raw())


def save_identity(identity: Identity, path: str | os.PathLike) -> None:
    """Write the key with mode 0600 from the first byte (never world-readable, even briefly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
    try:
        os.fchmod(fd, KEY_FILE_MODE)  # umask or a pre-existing file must not widen it
        os.write(fd, identity.to_pem())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_identity(path: str | os.PathLike | None) -> Identity:
    """Load the identity at `path`, creating it there on first use; `None` = ephemeral."""
    if path is None:
        return Identity.generate()
    path = Path(path)
    if path.exists():
        return load_identity(path)
    identity = Identity.generate()
    save_identity(identity, path)
    return identity
