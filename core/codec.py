"""Payload encryption (issue 14): an AES-GCM payload codec with a key ring.

Every payload the client, the worker and the API send to Temporal is encrypted when the setting
`payload_encryption` is on: the whole serialized payload (its metadata and data) becomes the data
of a new payload whose metadata says `encoding: binary/encrypted` and names the key in
`encryption-key-id` (the conventions of the Temporal samples, so their tools recognise it).

- Keys come from `payload_keys` (`<id>=<base64 of 32 bytes>`, comma-separated, newest last) or
  from the file named by `payload_keys_file` (one `id=key` a line, `#` comments), never the repo.
- Rotation: new payloads use the newest key; every listed key still decrypts. Drop a key only
  once no history that a worker may replay, and nothing an operator may read, still uses it.
- AES-256-GCM, a random 12-byte nonce per payload (stored before the ciphertext), the key id as
  associated data (a payload relabelled with another key id fails authentication).
- Payloads that are not encrypted pass through decode, so instances started before encryption
  was switched on still replay; with the setting off but keys listed, the codec only decrypts.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from core.settings import Settings

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEYS_SETTING = "PROCFLOW_PAYLOAD_KEYS"
KEYS_FILE_SETTING = "PROCFLOW_PAYLOAD_KEYS_FILE"


class PayloadKeyError(ValueError):
    """The key settings are invalid (the message names the setting, never a key). A ValueError,
    not a RuntimeError: the API's Temporal connection retries RuntimeErrors, this must stop it."""


class PayloadDecryptionError(Exception):
    """An encrypted payload cannot be decrypted: its key id is unknown or it fails to
    authenticate (tampered, or another key under the same id)."""


def parse_keys(text: str, source: str) -> list[tuple[str, bytes]]:
    """`id=base64key` entries separated by commas or new lines (`#` starts a comment), in
    order. PayloadKeyError naming `source` for a bad id, bad base64, a key that is not 32 bytes
    or an id listed twice. The messages name ids and positions, never a key."""
    keys: list[tuple[str, bytes]] = []
    entries = [
        entry.strip()
        for line in text.splitlines()
        for entry in line.split("#", 1)[0].split(",")
        if entry.strip()
    ]
    for position, entry in enumerate(entries, start=1):
        key_id, sep, encoded = (part.strip() for part in entry.partition("="))
        if not sep or not key_id:
            raise PayloadKeyError(f"{source}: entry {position} is not `<key id>=<base64 key>`")
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise PayloadKeyError(
                f"{source}: entry {position} has an invalid key id (letters, digits, `.`, `_`, "
                "`-`, at most 64, starting with a letter or digit)"
            )
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise PayloadKeyError(f"{source}: key {key_id!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise PayloadKeyError(
                f"{source}: key {key_id!r} is {len(key)} bytes, AES-256 needs {KEY_BYTES}"
            )
        if any(known == key_id for known, _ in keys):
            raise PayloadKeyError(f"{source}: key id {key_id!r} is listed twice")
        keys.append((key_id, key))
    return keys


def keys_from_settings(settings: Settings) -> list[tuple[str, bytes]]:
    """The key ring of the settings, newest last; [] when none is configured. PayloadKeyError
    when both sources are set, the file cannot be read, or an entry is invalid."""
    if settings.payload_keys.strip() and settings.payload_keys_file:
        raise PayloadKeyError(f"set {KEYS_SETTING} or {KEYS_FILE_SETTING}, not both")
    if settings.payload_keys_file:
        path = Path(settings.payload_keys_file)
        try:
            text = path.read_text()
        except OSError as err:
            raise PayloadKeyError(
                f"{KEYS_FILE_SETTING}: cannot read {path}: {err.strerror or err}"
            ) from None
        return parse_keys(text, f"{KEYS_FILE_SETTING} ({path})")
    return parse_keys(settings.payload_keys, KEYS_SETTING)


class EncryptionCodec(PayloadCodec):
    """AES-GCM over whole payloads; encrypts with the newest key (unless decrypt_only), decrypts
    with any key of the ring, passes unencrypted payloads through decode."""

    def __init__(self, keys: Sequence[tuple[str, bytes]], *, decrypt_only: bool = False) -> None:
        if not keys:
            raise PayloadKeyError(
                f"payload encryption needs a key: set {KEYS_SETTING} or {KEYS_FILE_SETTING}"
            )
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys}
        self.key_ids = [key_id for key_id, _ in keys]
        self.encrypt_key_id: str | None = None if decrypt_only else self.key_ids[-1]

    @classmethod
    def from_settings(cls, settings: Settings) -> EncryptionCodec | None:
        """The codec the settings ask for: encrypting when payload_encryption is on (a key is
        then required), decrypt-only when it is off but keys are listed, else None."""
        keys = keys_from_settings(settings)
        if settings.payload_encryption:
            return cls(keys)
        return cls(keys, decrypt_only=True) if keys else None

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.encrypt_key_id
        if key_id is None:
            return payload
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), key_id.encode())
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: key_id.encode()}, data=nonce + sealed
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # not encrypted: written before encryption was switched on
        raw_id = payload.metadata.get(KEY_ID)
        if raw_id is None:
            raise PayloadDecryptionError(f"encrypted payload without {KEY_ID} metadata")
        key_id = raw_id.decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadDecryptionError(
                f"payload encrypted with key id {key_id!r}, which is not in the key ring "
                f"({', '.join(self.key_ids)}): add that key to {KEYS_SETTING} or "
                f"{KEYS_FILE_SETTING}"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], raw_id)
        except InvalidTag:
            raise PayloadDecryptionError(
                f"payload encrypted with key id {key_id!r} fails authentication: it was altered, "
                "or encrypted with another key under the same id"
            ) from None
        decoded = Payload()
        decoded.ParseFromString(plain)
        return decoded
