"""Identity keys and record signatures for MoLink peers and clients."""

from molink.crypto.identity import Identity, IdentityFileError, load_or_create_identity
from molink.crypto.signing import (
    SignatureError,
    canonical_bytes,
    sign_record,
    verify_record,
)

__all__ = [
    "Identity",
    "IdentityFileError",
    "SignatureError",
    "canonical_bytes",
    "load_or_create_identity",
    "sign_record",
    "verify_record",
]
