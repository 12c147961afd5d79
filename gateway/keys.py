"""API key material: generation, parsing and constant-time verification.

A key reads `plf_<id>_<secret>`: `id` is 16 hex chars (public, shown in listings and usage),
`secret` is 32 random bytes in base64url (256 bits). Only SHA-256 of the whole key is stored:
the secret is high-entropy, so a slow password hash would buy nothing and cost every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "plf_"
KEY_ID_HEX_CHARS = 16
SECRET_BYTES = 32
_SECRET_CHARS = 43  # len(base64url(32 bytes)) without padding
KEY_LENGTH = len(KEY_PREFIX) + KEY_ID_HEX_CHARS + 1 + _SECRET_CHARS
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    key: str  # the full secret; returned once, never stored
    hash: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> NewKey:
    key_id = secrets.token_hex(KEY_ID_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    key = f"{KEY_PREFIX}{key_id}_{secret}"
    return NewKey(id=key_id, key=key, hash=hash_key(key))


def parse_key_id(key: str) -> str | None:
    """The public id of a well-formed key, or None; cheap, before any store lookup."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return None
    key_id = key[len(KEY_PREFIX):len(KEY_PREFIX) + KEY_ID_HEX_CHARS]
    if key[len(KEY_PREFIX) + KEY_ID_HEX_CHARS] != "_" or not set(key_id) <= _HEX:
        return None
    return key_id


def verify_key(key: str, stored_hash: str) -> bool:
    """Constant-time comparison of the presented key's hash with the stored one."""
    return hmac.compare_digest(hash_key(key), stored_hash)


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)
