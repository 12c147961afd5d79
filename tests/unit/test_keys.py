"""API key material: entropy, format, parsing and hashing."""

from __future__ import annotations

from gateway.keys import KEY_LENGTH, KEY_PREFIX, generate_key, hash_key, parse_key_id, verify_key


def test_generated_keys_are_unique_prefixed_and_parse_back() -> None:
    keys = [generate_key() for _ in range(200)]
    assert len({k.key for k in keys}) == 200
    for new in keys:
        assert new.key.startswith(KEY_PREFIX) and len(new.key) == KEY_LENGTH
        assert parse_key_id(new.key) == new.id
        assert new.hash == hash_key(new.key) and new.key not in new.hash
        assert verify_key(new.key, new.hash)


def test_secret_has_at_least_128_bits() -> None:
    new = generate_key()
    secret = new.key.split("_", 2)[2]
    assert len(secret) * 6 >= 256  # base64url: 6 bits per character


def test_malformed_keys_have_no_id() -> None:
    good = generate_key().key
    for bad in ["", "plf_", good[:-1], good + "x", "sk-" + good[3:], good.replace("_", "-", 2),
                KEY_PREFIX + "G" * 16 + "_" + "a" * 43]:
        assert parse_key_id(bad) is None, bad
    assert not verify_key(good, hash_key(good + "x"))
