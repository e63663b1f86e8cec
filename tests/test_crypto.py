"""Peer identities and record signatures."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molink.crypto import (
    Identity,
    IdentityFileError,
    SignatureError,
    canonical_bytes,
    load_or_create_identity,
    sign_record,
    verify_record,
)
from molink.crypto.identity import peer_id_from_public_key


def test_identity_is_created_once_with_mode_0600_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(path)
    assert again.seed == first.seed
    assert again.peer_id == first.peer_id


def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "peer.key"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityFileError, match="chmod 600"):
        load_or_create_identity(path)


def test_garbage_key_file_is_a_clear_error(tmp_path):
    path = tmp_path / "peer.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityFileError, match="not a PEM"):
        load_or_create_identity(path)


def test_peer_id_is_derived_from_the_same_key():
    identity = Identity.generate()
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id
    assert identity.peer_id.to_base58().startswith("12D3KooW")  # Ed25519 libp2p ids
    assert identity.keypair.public_key.to_bytes() == identity.public_key


def test_signature_verifies_and_binds_kind_key_and_content():
    alice, mallory = Identity.generate(), Identity.generate()
    record = {"start": 0, "end": 4, "addrs": ["/ip4/127.0.0.1/tcp/1"], "throughput": 12.5}
    sig = sign_record(alice, "span", record)
    verify_record(alice.public_key, "span", record, sig)
    with pytest.raises(SignatureError):
        verify_record(alice.public_key, "withdraw", record, sig)  # domain separation
    with pytest.raises(SignatureError):
        verify_record(mallory.public_key, "span", record, sig)
    with pytest.raises(SignatureError):
        verify_record(alice.public_key, "span", {**record, "end": 5}, sig)
    with pytest.raises(SignatureError):
        verify_record(alice.public_key, "span", record, sig[:10])


def test_canonical_bytes_ignore_key_order():
    assert canonical_bytes({"a": 1, "b": [1, 2]}) == canonical_bytes({"b": (1, 2), "a": 1})


records = st.dictionaries(st.text(max_size=6), st.integers(-2**63, 2**63 - 1) | st.text(max_size=6)
                          | st.binary(max_size=8) | st.floats(allow_nan=False), max_size=6)


@settings(max_examples=100, deadline=None)
@given(record=records, flip=st.integers(0, 63))
def test_any_bit_flip_in_a_signature_fails(record, flip):
    identity = Identity.generate()
    sig = bytearray(sign_record(identity, "span", record))
    verify_record(identity.public_key, "span", record, bytes(sig))
    sig[flip] ^= 1
    with pytest.raises(SignatureError):
        verify_record(identity.public_key, "span", record, bytes(sig))
