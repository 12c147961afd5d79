"""Sizing a model to GPUs from its architecture: weights, KV cache, tokens that fit, prices.

Pure arithmetic on frozen values, so `deploy plan` runs offline and the tests check the figures
by hand. Prices are the one input from outside: SkyPilot's catalog, looked up through an injected
function with a timeout, and reported as "prices unavailable offline" when it cannot be reached.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

GB = 10**9  # accelerator memory is sold in decimal GB; using it (not GiB) errs on the safe side
GIB = 2**30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of each GPU it may use
ACTIVATION_RESERVE_BYTES = 2 * GIB  # per GPU: peak activations, CUDA graphs, NCCL buffers
TP_DEGREES = (1, 2, 4, 8)
PRICES_UNAVAILABLE = "prices unavailable offline"


@dataclass(frozen=True)
class ModelArch:
    """What sizing needs from a model's config.json (Mistral/Mixtral names in comments)."""

    name: str
    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size (per expert)
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (grouped-query attention)
    head_dim: int
    experts: int  # num_local_experts (1 for a dense model)
    experts_per_token: int  # num_experts_per_tok
    vocab: int
    total_params: float  # every expert is resident in memory
    active_params: float  # what one token computes with
    context: int  # max_position_embeddings the tier serves
    dtype_bytes: int = 2  # bf16

    @property
    def weights_bytes(self) -> float:
        return self.total_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: 2 * layers * kv_heads * head_dim * dtype."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


MIXTRAL_8X7B = ModelArch(
    name="Mixtral-8x7B", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
    head_dim=128, experts=8, experts_per_token=2, vocab=32000, total_params=46.7e9,
    active_params=12.9e9, context=32768)
MIXTRAL_8X22B = ModelArch(
    name="Mixtral-8x22B", layers=56, hidden=6144, intermediate=16384, heads=48, kv_heads=8,
    head_dim=128, experts=8, experts_per_token=2, vocab=32768, total_params=141e9,
    active_params=39e9, context=65536)
MISTRAL_7B = ModelArch(
    name="Mistral-7B", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
    head_dim=128, experts=1, experts_per_token=1, vocab=32768, total_params=7.25e9,
    active_params=7.25e9, context=32768)

TIER_MODELS: Mapping[str, ModelArch] = {
    "tiny": MISTRAL_7B, "small": MIXTRAL_8X7B, "medium": MIXTRAL_8X22B}


@cache
def known_accelerators() -> dict[str, float]:
    """The project's accelerator list (deploy/data/accelerators.yaml): name -> memory GB."""
    text = resources.files("deploy").joinpath("data/accelerators.yaml").read_text("utf-8")
    data = yaml.safe_load(text)["accelerators"]
    return {str(name): float(entry["memory_gb"]) for name, entry in data.items()}


@dataclass(frozen=True)
class Price:
    """Cheapest hourly price of an accelerator set in SkyPilot's catalog, across clouds."""

    on_demand: float | None
    spot: float | None
    cloud: str


@dataclass(frozen=True)
class Sizing:
    """One accelerator set for one model: what each GPU holds and what is left for KV cache."""

    accelerator: str
    count: int  # = tensor-parallel degree
    gpu_memory_gb: float
    weights_per_gpu_bytes: float
    kv_bytes_per_token_per_gpu: float
    kv_budget_per_gpu_bytes: float
    kv_tokens: int  # tokens of KV cache the whole set holds
    full_sequences: int  # sequences at the full context that fit at once
    fits: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def kv_bytes_per_token_per_gpu(arch: ModelArch, tp: int) -> float:
    """TP splits the KV heads across GPUs; past kv_heads GPUs each GPU keeps one head's copy."""
    heads_per_gpu = max(1.0, arch.kv_heads / tp)
    return 2 * arch.layers * heads_per_gpu * arch.head_dim * arch.dtype_bytes


def size(arch: ModelArch, accelerator: str, count: int, memory_gb: float, context: int,
         gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
         reserve_bytes: float = ACTIVATION_RESERVE_BYTES) -> Sizing:
    """Size `arch` on `count` GPUs of `memory_gb` with tensor parallelism of degree `count`.

    Per GPU: usable = memory * utilization; weights are split evenly (vLLM shards attention,
    every expert's FFN and the vocab-parallel embeddings); the reserve covers activations; the
    rest is KV cache. A set fits when it holds at least one full-context sequence.
    """
    weights_per_gpu = arch.weights_bytes / count
    kv_per_token = kv_bytes_per_token_per_gpu(arch, count)
    budget = memory_gb * GB * gpu_memory_utilization - weights_per_gpu - reserve_bytes
    tokens = int(budget // kv_per_token) if budget > 0 else 0
    sequences = tokens // context
    if arch.heads % count:
        fits, reason = False, f"{arch.heads} attention heads do not split over {count} GPUs"
    elif budget <= 0:
        fits, reason = False, "weights do not fit"
    elif sequences < 1:
        fits, reason = False, f"no room for one {context}-token sequence"
    else:
        fits, reason = True, "fits"
    return Sizing(accelerator, count, memory_gb, weights_per_gpu, kv_per_token, max(budget, 0.0),
                  tokens, sequences, fits, reason)


def plan(arch: ModelArch, context: int | None = None,
         accelerators: Mapping[str, float] | None = None,
         degrees: Sequence[int] = TP_DEGREES) -> list[Sizing]:
    """Every accelerator at every TP degree, smallest sets first within each accelerator."""
    context = context or arch.context
    accelerators = accelerators if accelerators is not None else known_accelerators()
    return [size(arch, name, count, memory, context)
            for name, memory in accelerators.items() for count in degrees]


def smallest_fits(sizings: Sequence[Sizing]) -> list[Sizing]:
    """For each accelerator, the fewest GPUs that fit: the sets worth renting."""
    best: dict[str, Sizing] = {}
    for sizing in sizings:
        if sizing.fits and sizing.accelerator not in best:
            best[sizing.accelerator] = sizing
    return sorted(best.values(), key=lambda s: (s.count * s.gpu_memory_gb, s.accelerator))


PriceLookup = Callable[[Sequence[tuple[str, int]]], Mapping[tuple[str, int], Price]]


def attach_prices(sets: Sequence[Sizing], lookup: PriceLookup | None
                  ) -> tuple[dict[tuple[str, int], Price], str | None]:
    """Prices for `sets`, or the note saying why there are none (never raises, never hangs:
    the lookup owns its timeout and raises OSError/TimeoutError when offline)."""
    if lookup is None:
        return {}, PRICES_UNAVAILABLE
    try:
        prices = dict(lookup([(s.accelerator, s.count) for s in sets]))
    except (OSError, TimeoutError, LookupError, ValueError) as exc:
        return {}, f"{PRICES_UNAVAILABLE} ({type(exc).__name__})"
    if not prices:
        return {}, PRICES_UNAVAILABLE
    return prices, None


def _gb(value: float) -> str:
    return f"{value / GB:.1f}"


def render_table(arch: ModelArch, context: int, sizings: Sequence[Sizing],
                 prices: Mapping[tuple[str, int], Price], note: str | None) -> str:
    """The human view: the model's figures, then one row per accelerator set that fits."""
    lines = [
        f"{arch.name}: {arch.total_params / 1e9:.1f}B parameters ({arch.active_params / 1e9:.1f}B "
        f"active, {arch.experts} experts, top-{arch.experts_per_token}), "
        f"weights {_gb(arch.weights_bytes)} GB at {arch.dtype_bytes} bytes/param",
        f"KV cache: {arch.kv_bytes_per_token} bytes/token ({arch.kv_bytes_per_token / 1024:.0f} "
        f"KiB), {arch.kv_bytes_per_token * context / GIB:.2f} GiB per {context}-token sequence",
        "weights per GPU: " + ", ".join(
            f"TP={tp} {_gb(arch.weights_bytes / tp)} GB" for tp in TP_DEGREES),
        "",
        f"{'accelerators':<16}{'TP':>3}{'weights/GPU GB':>16}{'KV GB/GPU':>11}"
        f"{'KV tokens':>12}{'full seqs':>10}{'$/h':>9}{'spot $/h':>10}",
    ]
    for s in smallest_fits(sizings):
        price = prices.get((s.accelerator, s.count))
        on_demand = f"{price.on_demand:.2f}" if price and price.on_demand else "-"
        spot = f"{price.spot:.2f}" if price and price.spot else "-"
        lines.append(
            f"{s.accelerator + ':' + str(s.count):<16}{s.count:>3}"
            f"{_gb(s.weights_per_gpu_bytes):>16}{_gb(s.kv_budget_per_gpu_bytes):>11}"
            f"{s.kv_tokens:>12,}{s.full_sequences:>10}{on_demand:>9}{spot:>10}")
    if note:
        lines += ["", note]
    return "\n".join(lines)


def plan_json(arch: ModelArch, context: int, sizings: Sequence[Sizing],
              prices: Mapping[tuple[str, int], Price], note: str | None) -> dict[str, Any]:
    """The machine view (`deploy plan --json`): the model, every set, and price status."""
    def row(s: Sizing) -> dict[str, Any]:
        price = prices.get((s.accelerator, s.count))
        return {**s.to_json(), "price": asdict(price) if price else None}

    return {
        "model": asdict(arch), "context": context,
        "weights_bytes": arch.weights_bytes, "kv_bytes_per_token": arch.kv_bytes_per_token,
        "kv_bytes_per_sequence": arch.kv_bytes_per_token * context,
        "fits": [row(s) for s in smallest_fits(sizings)],
        "all": [row(s) for s in sizings],
        "prices_note": note,
    }
