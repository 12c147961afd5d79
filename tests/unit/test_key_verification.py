"""The key check is constant-time by construction: the presented key is hashed and the two
SHA-256 digests are compared with `hmac.compare_digest`, for a wrong secret as for a right one.

Timing tests are flaky on a shared machine; instead `hmac.compare_digest` is wrapped in a spy
(the real function still decides) and the test asserts what reaches it: two equal-length hex
digests, never the raw key, on every path that holds a stored record.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import pytest

from gateway.auth import Authenticator
from gateway.config import parse_catalog
from gateway.errors import AuthenticationFailed
from gateway.keys import generate_key
from gateway.store import KeyRecord, open_store

CATALOG = {"models": {"m": {"upstream_model": "x", "replicas": ["http://127.0.0.1:9"]}},
           "plans": {"beta": {"models": ["m"]}}}


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, object]]:
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: object, b: object) -> bool:
        calls.append((a, b))
        return real(a, b)  # type: ignore[arg-type]

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


async def test_every_verification_compares_digests_in_constant_time(
        tmp_path: Path, compared: list[tuple[object, object]]) -> None:
    catalog = parse_catalog({"store": f"sqlite:///{tmp_path / 's.db'}", **CATALOG}, "test")
    store = open_store(catalog.store)
    new = generate_key()
    await store.create_key(KeyRecord(id=new.id, hash=new.hash, owner="o", plan="beta",
                                     created_at=time.time()))
    auth = Authenticator(store, catalog, catalog.server)
    try:
        assert (await auth.authenticate(f"Bearer {new.key}")).key_id == new.id
        wrong = new.key[:-1] + ("A" if new.key[-1] != "A" else "B")  # same id, same length
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"Bearer {wrong}")
        near = new.key[:-5] + "_____"
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate(f"Bearer {near}")
    finally:
        await store.close()

    assert len(compared) == 3, compared
    for (presented, stored), key in zip(compared, [new.key, wrong, near]):
        assert stored == new.hash
        assert presented == hashlib.sha256(key.encode()).hexdigest()
        assert isinstance(presented, str) and len(presented) == len(new.hash) == 64
        assert key not in (presented, stored)  # never the raw secret
    assert [a == b for a, b in compared] == [True, False, False]


def test_only_the_hash_is_stored_and_the_secret_has_256_bits() -> None:
    keys = [generate_key() for _ in range(50)]
    assert len({k.key for k in keys}) == 50
    for new in keys:
        assert new.key.startswith(f"plf_{new.id}_")
        secret = new.key[len(f"plf_{new.id}_"):]
        assert len(secret) == 43  # base64url of 32 bytes
        assert new.hash == hashlib.sha256(new.key.encode()).hexdigest()
        assert secret not in new.hash
