"""Who may take part in a swarm, and who wrote a record: the swarm key and the peers' own keys.

Two keys, two questions (the threat model is in ``docs/security.md``):

- **The swarm key** (:class:`SwarmKey`, a 32-byte secret in a file every member holds, like IPFS's
  ``swarm.key``) answers "is this peer one of us?". A member proves it on every stream it opens with
  ``HMAC(key, its own peer id)`` (:meth:`SwarmKey.member_proof`): libp2p has already authenticated the
  caller's peer id, so the proof cannot be replayed by anyone else, and a server refuses a stream without a
  good one before reading anything more. Records are sealed with it (ChaCha20-Poly1305, stored under
  key names and subkeys derived from it), so an outsider can neither find, read nor write them, and members'
  DHT nodes refuse to store anything not sealed with it. No swarm key: an *open* swarm, labelled so.
- **A peer's own key** (:class:`PeerKey`, the RSA key behind its libp2p peer id) answers "who wrote this
  record?". Every record is signed by its writer (:func:`sign_record`); a server's record names the peer that
  signed it, so no peer (member or not) can announce in another's name, and a signed expiry bounds how long a
  copy can be replayed.

Everything here is pure: no network, no event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hivemind.proto import crypto_pb2

from corolla.wire.codec import pack, unpack
from corolla.wire.errors import BadRequestError
from corolla.wire.records import MAX_RECORD_BYTES, RecordClaim, SignedRecord

KEY_FILE_HEADER = "corolla-swarm-key/1"
SECRET_BYTES = 32
#: A signed record may not claim to live longer than this (a replayed copy dies with its signed expiry).
MAX_RECORD_TTL = 24 * 3600.0
#: Clock skew tolerated between a record's writer and its reader.
CLOCK_SKEW = 300.0
_NONCE_BYTES = 12
#: The seal authenticates membership and hides the record; where it may be stored is in the signed claim.
_SEAL_CONTEXT = b"corolla record v1"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


#: The swarm key file used when a command or client is given none (``--swarm_key ""`` / ``swarm_key=""``: open).
SWARM_KEY_ENV = "COROLLA_SWARM_KEY"


def swarm_key_path(explicit: str | None) -> str | None:
    """The key file to use: ``explicit`` if given ("" means none: an open swarm), else $COROLLA_SWARM_KEY."""
    if explicit is None:
        explicit = os.environ.get(SWARM_KEY_ENV)
    return explicit or None


class SwarmKeyError(ValueError):
    """A swarm key file that cannot be used (missing, malformed, readable by others)."""


class SwarmKey:
    """The secret that makes a swarm private. Load with :meth:`load`; make one with :meth:`generate`."""

    def __init__(self, secret: bytes):
        if len(secret) != SECRET_BYTES:
            raise SwarmKeyError(f"a swarm key is {SECRET_BYTES} bytes, got {len(secret)}")
        self._member = _derive(secret, b"corolla member proof v1")
        self._names = _derive(secret, b"corolla record names v1")
        self._seal = ChaCha20Poly1305(_derive(secret, b"corolla record seal v1"))
        #: 8 hex digits that name the key in logs and `corolla health` (reveals nothing usable)
        self.fingerprint = _derive(secret, b"corolla fingerprint v1")[:4].hex()

    @classmethod
    def generate(cls, path: str | os.PathLike) -> SwarmKey:
        """Write a new random key to ``path`` (mode 0600); refuses to overwrite an existing file."""
        secret = os.urandom(SECRET_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{KEY_FILE_HEADER}\n{secret.hex()}\n")
        return cls(secret)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SwarmKey:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SwarmKeyError(f"cannot read the swarm key {path}: {e.strerror or e}") from e
        lines = text.split()
        if len(lines) != 2 or lines[0] != KEY_FILE_HEADER:
            raise SwarmKeyError(f"{path} is not a corolla swarm key (make one with `corolla swarm-key {path}`)")
        try:
            secret = bytes.fromhex(lines[1])
        except ValueError:
            raise SwarmKeyError(f"{path}: the key is not hexadecimal") from None
        if path.stat().st_mode & 0o077:
            raise SwarmKeyError(f"{path} is readable by other users of this machine: run `chmod 600 {path}`")
        return cls(secret)

    def member_proof(self, peer_id: str) -> bytes:
        """What ``peer_id`` shows on each stream it opens: only a key holder can compute it."""
        return hmac.new(self._member, peer_id.encode(), hashlib.sha256).digest()

    def is_member(self, peer_id: str, proof: bytes) -> bool:
        return hmac.compare_digest(self.member_proof(peer_id), proof)

    def name(self, plain: str) -> str:
        """The DHT key or subkey ``plain`` is stored under: outsiders can neither guess nor invert it."""
        return hmac.new(self._names, plain.encode(), hashlib.sha256).hexdigest()

    def seal(self, data: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._seal.encrypt(nonce, data, context)

    def unseal(self, blob: bytes, context: bytes) -> bytes | None:
        """The sealed data, or None if ``blob`` was not sealed with this key for ``context``."""
        if len(blob) < _NONCE_BYTES + 16:
            return None
        try:
            return self._seal.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], context)
        except InvalidTag:
            return None


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


class PeerKey:
    """The private key of a libp2p identity file as hivemind writes it (an RSA key in libp2p's protobuf)."""

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._key = private_key
        self.public_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.peer_id = peer_id_of(self.public_der)

    @classmethod
    def from_identity_file(cls, path: str | os.PathLike) -> PeerKey:
        data = Path(path).read_bytes()
        try:
            proto = crypto_pb2.PrivateKey.FromString(data)
            key = serialization.load_der_private_key(proto.data, password=None)
        except Exception as e:  # protobuf and cryptography raise several kinds
            raise ValueError(f"{path} is not a libp2p identity file: {e}") from e
        if proto.key_type != crypto_pb2.KeyType.RSA or not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: only RSA identities (what hivemind makes) are supported")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _PSS, hashes.SHA256())


@lru_cache(maxsize=4096)
def peer_id_of(public_der: bytes) -> str:
    """libp2p's peer id of an RSA public key: the sha256 multihash of its protobuf encoding, in base58."""
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=public_der).SerializeToString()
    return base58.b58encode(b"\x12\x20" + hashlib.sha256(proto).digest()).decode()


@lru_cache(maxsize=4096)
def _signature_ok(public_der: bytes, data: bytes, signature: bytes) -> bool:
    try:
        key = serialization.load_der_public_key(public_der)
    except ValueError:
        return False
    if not isinstance(key, rsa.RSAPublicKey) or not 2048 <= key.key_size <= 4096:
        return False
    try:
        key.verify(signature, data, _PSS, hashes.SHA256())
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Trust:
    """What a peer signs and seals its records with: its own key and, in a private swarm, the swarm key."""

    peer_key: PeerKey
    swarm_key: SwarmKey | None = None

    def member_proof(self) -> bytes | None:
        return None if self.swarm_key is None else self.swarm_key.member_proof(self.peer_key.peer_id)

    def dht_name(self, plain: str) -> str:
        return dht_name(self.swarm_key, plain)


def dht_name(swarm_key: SwarmKey | None, plain: str) -> str:
    """Where a record named ``plain`` (a DHT key or subkey) lives: itself in an open swarm, else a name
    derived from the swarm key."""
    return plain if swarm_key is None else "corolla:" + swarm_key.name(plain)


class RecordRejected(ValueError):
    """Why a record was not accepted; the reason is a short stable label (counted by readers)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def sign_record(trust: Trust, claim: RecordClaim) -> bytes:
    """The DHT value for ``claim``: signed by this peer, sealed with the swarm key if there is one."""
    body = pack(claim)
    signed = pack(
        SignedRecord(claim=body, public_key=trust.peer_key.public_der, signature=trust.peer_key.sign(body))
    )
    if trust.swarm_key is not None:
        signed = trust.swarm_key.seal(signed, _SEAL_CONTEXT)
    if len(signed) > MAX_RECORD_BYTES:
        raise ValueError(f"a record of {len(signed)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    return signed


def open_record(
    swarm_key: SwarmKey | None, value: object, dht_key: str | None, dht_subkey: str, now: float | None = None
) -> tuple[RecordClaim, str]:
    """Check a value found under (``dht_key``, ``dht_subkey``); returns its claim and its signer's peer id.
    ``dht_key`` None: the caller knows only the key's hash and compares it with the claim's key itself.

    Raises :class:`RecordRejected` unless: it fits the size limit, opens with the swarm key (private swarms),
    decodes, carries a valid signature of the key whose peer id it names, was stored where its claim says,
    and has not expired (its signed expiry; a claim of living longer than :data:`MAX_RECORD_TTL` is refused).
    A claim that names an owner (a server's record: its peer id) must be signed by that peer and stored under
    the owner's subkey.
    """
    if not isinstance(value, bytes) or len(value) > MAX_RECORD_BYTES:
        raise RecordRejected("malformed", "not bytes or too large")
    data = value
    if swarm_key is not None:
        data = swarm_key.unseal(value, _SEAL_CONTEXT)
        if data is None:
            raise RecordRejected("not_sealed", "not sealed with this swarm's key")
    try:
        signed = unpack(SignedRecord, data, max_tensor_bytes=0)
        claim = unpack(RecordClaim, signed.claim, max_tensor_bytes=0)
    except BadRequestError as e:
        raise RecordRejected("malformed", str(e)) from None
    if not _signature_ok(signed.public_key, signed.claim, signed.signature):
        raise RecordRejected("bad_signature")
    signer = peer_id_of(signed.public_key)
    if (dht_key is not None and claim.dht_key != dht_key) or claim.dht_subkey != dht_subkey:
        raise RecordRejected("misplaced", "signed for another key or subkey")
    if claim.owner and (claim.owner != signer or dht_subkey != dht_name(swarm_key, claim.owner)):
        raise RecordRejected("forged", f"names {claim.owner} but is signed by {signer}")
    now = time.time() if now is None else now
    if claim.expiration <= now:
        raise RecordRejected("expired", f"expired {now - claim.expiration:.0f} s ago")
    if claim.expiration > now + MAX_RECORD_TTL + CLOCK_SKEW:
        raise RecordRejected("too_long", "claims to live longer than a record may")
    return claim, signer
