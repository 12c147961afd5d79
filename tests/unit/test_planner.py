"""Planner figures for Mixtral 8x7B checked against arithmetic written out by hand."""

from __future__ import annotations

import pytest

from deploy import planner
from deploy.planner import GB, GIB, MIXTRAL_8X7B, Price

CONTEXT = 32768


def test_mixtral_weights_and_kv_per_token() -> None:
    assert MIXTRAL_8X7B.weights_bytes == pytest.approx(46.7e9 * 2)  # 93.4 GB of bf16
    assert MIXTRAL_8X7B.weights_bytes / GB == pytest.approx(93.4)
    assert MIXTRAL_8X7B.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072  # 128 KiB
    assert MIXTRAL_8X7B.kv_bytes_per_token * CONTEXT == 4 * GIB  # 4 GiB per full sequence


def test_tp1_on_80gb_does_not_fit() -> None:
    sizing = planner.size(MIXTRAL_8X7B, "H100", 1, 80, CONTEXT)
    # 80e9 * 0.9 = 72e9 usable < 93.4e9 of weights
    assert not sizing.fits
    assert sizing.reason == "weights do not fit"
    assert sizing.kv_tokens == 0


def test_tp2_on_80gb_fits_with_hand_computed_tokens() -> None:
    sizing = planner.size(MIXTRAL_8X7B, "H100", 2, 80, CONTEXT)
    weights_per_gpu = 93.4e9 / 2  # 46.7e9
    kv_per_token_per_gpu = 2 * 32 * (8 / 2) * 128 * 2  # 65536: TP splits the 8 KV heads
    budget = 80e9 * 0.9 - weights_per_gpu - 2 * 2**30  # 23.15e9
    assert sizing.weights_per_gpu_bytes == pytest.approx(weights_per_gpu)
    assert sizing.kv_bytes_per_token_per_gpu == kv_per_token_per_gpu
    assert sizing.kv_budget_per_gpu_bytes == pytest.approx(budget)
    assert sizing.kv_tokens == int(budget // kv_per_token_per_gpu) == 353279
    assert sizing.full_sequences == 353279 // 32768 == 10
    assert sizing.fits


def test_h200_alone_fits() -> None:
    sizing = planner.size(MIXTRAL_8X7B, "H200", 1, 141, CONTEXT)
    budget = 141e9 * 0.9 - 93.4e9 - 2 * 2**30
    assert sizing.kv_tokens == int(budget // 131072)
    assert sizing.fits and sizing.full_sequences == sizing.kv_tokens // CONTEXT


def test_kv_heads_replicate_past_kv_head_count() -> None:
    # 16 GPUs > 8 KV heads: each GPU keeps one head's K and V per layer
    assert planner.kv_bytes_per_token_per_gpu(MIXTRAL_8X7B, 16) == 2 * 32 * 1 * 128 * 2


def test_heads_must_split_evenly() -> None:
    sizing = planner.size(MIXTRAL_8X7B, "X", 3, 80, CONTEXT)
    assert not sizing.fits and "heads" in sizing.reason


def test_no_room_for_one_full_sequence() -> None:
    # L4 x4: 24e9*0.9 - 23.35e9 < 0 -> weights do not fit; x8 fits with room
    assert not planner.size(MIXTRAL_8X7B, "L4", 4, 24, CONTEXT).fits
    tight = planner.size(MIXTRAL_8X7B, "T4", 8, 16, 10 * CONTEXT)
    assert not tight.fits and "sequence" in tight.reason


def test_smallest_fits_picks_fewest_gpus_per_accelerator() -> None:
    fits = planner.smallest_fits(planner.plan(MIXTRAL_8X7B, CONTEXT))
    chosen = {s.accelerator: s.count for s in fits}
    assert chosen["H200"] == 1
    assert chosen["H100"] == 2
    assert chosen["A100-80GB"] == 2
    assert chosen["A100"] == 4
    assert chosen["L40S"] == 4


def test_known_accelerators_memory() -> None:
    known = planner.known_accelerators()
    assert known["H200"] == 141 and known["H100"] == 80 and known["A100-80GB"] == 80
    assert known["A100"] == 40 and known["L40S"] == 48 and known["L4"] == 24


def test_prices_unavailable_when_lookup_fails() -> None:
    def offline(_sets: object) -> dict[tuple[str, int], Price]:
        raise OSError("Name or service not known")

    sets = planner.smallest_fits(planner.plan(MIXTRAL_8X7B))
    prices, note = planner.attach_prices(sets, offline)
    assert prices == {}
    assert note is not None and note.startswith(planner.PRICES_UNAVAILABLE)
    table = planner.render_table(MIXTRAL_8X7B, CONTEXT, planner.plan(MIXTRAL_8X7B), prices, note)
    assert "prices unavailable offline" in table and "H100:2" in table


def test_prices_shown_when_lookup_answers() -> None:
    sizings = planner.plan(MIXTRAL_8X7B)
    prices, note = planner.attach_prices(
        planner.smallest_fits(sizings), lambda sets: {("H100", 2): Price(6.5, 2.1, "aws")})
    assert note is None
    data = planner.plan_json(MIXTRAL_8X7B, CONTEXT, sizings, prices, note)
    row = next(r for r in data["fits"] if r["accelerator"] == "H100")
    assert row["price"] == {"on_demand": 6.5, "spot": 2.1, "cloud": "aws"}
    assert data["kv_bytes_per_sequence"] == 4 * GIB
