"""Swarm keys, member proofs, signed and sealed records, and the DHT's record validator (no network)."""

from __future__ import annotations

import dataclasses
import os
import time

import msgpack
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID

from corolla.swarm.discovery import RecordValidator
from corolla.swarm.trust import (
    MAX_RECORD_TTL,
    PeerKey,
    RecordRejected,
    SwarmKey,
    SwarmKeyError,
    Trust,
    open_record,
    sign_record,
)
from corolla.wire.codec import pack, unpack
from corolla.wire.records import RecordClaim, ServerInfo, ServerState, SignedRecord


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two peers' identities, made the way hivemind makes them."""
    out = []
    for name in ("a", "b"):
        path = tmp_path_factory.mktemp("id") / f"{name}.key"
        P2P.generate_identity(str(path))
        key = PeerKey.from_identity_file(path)
        assert key.peer_id == PeerID.from_identity(path.read_bytes()).to_base58()  # libp2p's derivation
        out.append(key)
    return out


@pytest.fixture
def swarm_key(tmp_path):
    return SwarmKey.generate(tmp_path / "swarm.key")


def claim(trust: Trust, owner: str | None = None, expires_in: float = 60.0, key: str = "m.0") -> RecordClaim:
    owner = trust.peer_key.peer_id if owner is None else owner
    return RecordClaim(
        kind="server", dht_key=trust.dht_name(key), dht_subkey=trust.dht_name(owner), owner=owner,
        expiration=time.time() + expires_in, body=pack(ServerInfo(ServerState.ONLINE, 0, 1)),
    )  # fmt: skip


def test_key_file_round_trip_and_clear_errors(tmp_path):
    path = tmp_path / "k"
    key = SwarmKey.generate(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert SwarmKey.load(path).member_proof("peer") == key.member_proof("peer")
    with pytest.raises(FileExistsError):
        SwarmKey.generate(path)  # never overwritten
    os.chmod(path, 0o644)
    with pytest.raises(SwarmKeyError, match="readable by other users"):
        SwarmKey.load(path)
    (tmp_path / "bad").write_text("hello\n")
    with pytest.raises(SwarmKeyError, match="not a corolla swarm key"):
        SwarmKey.load(tmp_path / "bad")
    with pytest.raises(SwarmKeyError, match="cannot read"):
        SwarmKey.load(tmp_path / "missing")


def test_member_proofs_are_bound_to_the_key_and_the_peer(swarm_key, tmp_path):
    proof = swarm_key.member_proof("QmAlice")
    assert swarm_key.is_member("QmAlice", proof)
    assert not swarm_key.is_member("QmMallory", proof)  # a proof shown by another peer id is worthless
    other = SwarmKey.generate(tmp_path / "other")
    assert not other.is_member("QmAlice", proof)


@pytest.mark.parametrize("private", [False, True])
def test_a_signed_record_opens_with_its_signer(keys, swarm_key, private):
    trust = Trust(keys[0], swarm_key if private else None)
    c = claim(trust)
    value = sign_record(trust, c)
    opened, signer = open_record(trust.swarm_key, value, c.dht_key, c.dht_subkey)
    assert opened == c and signer == keys[0].peer_id
    assert unpack(ServerInfo, opened.body, max_tensor_bytes=0).end == 1
    if private:  # sealed: nothing of the record is readable without the key, and the names are derived
        assert b"server" not in value and c.dht_key.startswith("corolla:")


def reason(swarm_key, value, c) -> str:
    with pytest.raises(RecordRejected) as info:
        open_record(swarm_key, value, c.dht_key, c.dht_subkey)
    return info.value.reason


def test_records_that_must_be_rejected(keys, swarm_key, tmp_path):
    alice, mallory = Trust(keys[0]), Trust(keys[1])
    # Mallory announces under Alice's id: signed by Mallory, so forged
    forged = claim(mallory, owner=alice.peer_key.peer_id)
    assert reason(None, sign_record(mallory, forged), forged) == "forged"
    # a valid record replayed after its signed expiry
    old = claim(alice, expires_in=-1.0)
    assert reason(None, sign_record(alice, old), old) == "expired"
    # a record that claims to live for a week (a replay window nobody should get)
    long = claim(alice, expires_in=MAX_RECORD_TTL * 7)
    assert reason(None, sign_record(alice, long), long) == "too_long"
    # moved to another block's key
    good = claim(alice)
    moved = dataclasses.replace(good, dht_key="m.5")
    assert reason(None, sign_record(alice, good), moved) == "misplaced"
    # a changed body under the original signature
    signed = unpack(SignedRecord, sign_record(alice, good), max_tensor_bytes=0)
    tampered_claim = dataclasses.replace(good, body=pack(ServerInfo(ServerState.ONLINE, 0, 9)))
    tampered = pack(dataclasses.replace(signed, claim=pack(tampered_claim)))
    assert reason(None, tampered, good) == "bad_signature"
    # an open-swarm record in a private swarm, and another swarm's sealed record
    assert reason(swarm_key, sign_record(alice, good), good) == "not_sealed"
    other = Trust(keys[0], SwarmKey.generate(tmp_path / "other"))
    assert reason(swarm_key, sign_record(other, claim(other)), claim(Trust(keys[0], swarm_key))) == "not_sealed"
    assert reason(None, b"\x00" * 40, good) == "malformed"


def dht_record(trust: Trust, c: RecordClaim, value: bytes, expiration: float | None = None) -> DHTRecord:
    """What hivemind's DHT node hands a validator: the key's hash, msgpack-serialized subkey and value."""
    return DHTRecord(
        key=DHTID.generate(source=c.dht_key).to_bytes(),
        subkey=msgpack.packb(c.dht_subkey),
        value=msgpack.packb(value, use_bin_type=True),
        expiration_time=c.expiration if expiration is None else expiration,
    )


@pytest.mark.parametrize("private", [False, True])
def test_dht_validator_stores_only_valid_records(keys, swarm_key, private):
    trust = Trust(keys[0], swarm_key if private else None)
    validator = RecordValidator(trust.swarm_key)
    c = claim(trust)
    value = sign_record(trust, c)
    assert validator.validate(dht_record(trust, c, value))
    # under another key's hash, or stored to outlive its signed expiry, or a forgery: refused
    assert not validator.validate(
        dataclasses.replace(dht_record(trust, c, value), key=DHTID.generate("x").to_bytes())
    )
    assert not validator.validate(dht_record(trust, c, value, expiration=c.expiration + 3600))
    mallory = Trust(keys[1], trust.swarm_key)
    forged = claim(mallory, owner=keys[0].peer_id)
    assert not validator.validate(dht_record(mallory, forged, sign_record(mallory, forged)))
    assert not validator.validate(dataclasses.replace(dht_record(trust, c, value), value=msgpack.packb(b"junk")))
    assert validator.refused == 4
    # an outsider (no swarm key) cannot get a record into a private swarm's DHT
    if private:
        outsider = Trust(keys[1])
        own = claim(outsider)
        outsider_record = dht_record(
            outsider, dataclasses.replace(own, dht_key=c.dht_key), sign_record(outsider, own)
        )
        assert not validator.validate(outsider_record)


def test_identity_files_other_than_rsa_are_refused_by_name(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from hivemind.proto import crypto_pb2

    key = ed25519.Ed25519PrivateKey.generate()
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "ed25519.key"
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=der).SerializeToString())
    with pytest.raises(ValueError, match="only RSA identities"):
        PeerKey.from_identity_file(path)
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not a libp2p identity file"):
        PeerKey.from_identity_file(tmp_path / "junk.key")
