"""Signatures over records: canonical msgpack bytes behind a domain-separation prefix.

The signed message is  b"molink-record/v1\\0" + kind + b"\\0" + canonical msgpack(record),
so a signature made for one record kind (say a span announcement) never validates another
(say a withdrawal or a verification report), even with identical fields.
"""

from __future__ import annotations

from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from molink.crypto.identity import Identity

SIGNATURE_DOMAIN = b"molink-record/v1\x00"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class SignatureError(Exception):
    """A record's signature is missing, malformed or does not verify."""


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("record maps must have string keys to be signed canonically")
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (bool, int, float, str, bytes)) or value is None:
        return value
    raise TypeError(f"cannot sign a value of type {type(value).__name__}")


def canonical_bytes(record: dict) -> bytes:
    """One byte string per record value: keys sorted, tuples as lists, floats as float64."""
    return msgpack.packb(_canonical(record), use_bin_type=True, use_single_float=False)


def signed_message(kind: str, record: dict) -> bytes:
    if not kind or "\x00" in kind:
        raise ValueError("record kind must be a non-empty string without NUL")
    return SIGNATURE_DOMAIN + kind.encode() + b"\x00" + canonical_bytes(record)


def sign_record(identity: Identity, kind: str, record: dict) -> bytes:
    return identity.sign(signed_message(kind, record))


def verify_record(public_key: bytes, kind: str, record: dict, signature: bytes) -> None:
    """Raise SignatureError unless `signature` is `public_key`'s signature of (kind, record)."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise SignatureError("public key must be 32 raw bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise SignatureError("signature must be 64 bytes")
    try:
        message = signed_message(kind, record)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"record cannot be canonicalised: {exc}") from exc
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(f"bad {kind} signature") from exc
