"""Build a tiny random-weight Mixtral-architecture model for CPU vLLM tests, offline and
deterministically from a seed.

It has Mixtral's shape where it matters to the serving path — 8 experts per layer, 2 routed per
token, grouped-query attention, Mixtral's real v1 tokenizer from ``mistral-common`` — and is
small everywhere else (hidden 128, 2 layers; ~9 M parameters, ~36 MB in float32), so vLLM starts
on a 2-core machine in well under a minute and its MoE path is the one production runs.

Run it with the vLLM virtualenv's interpreter (it needs torch and transformers, which the
project's main environment deliberately lacks)::

    .cache/vllm-venv/bin/python scripts/build_tiny_mixtral.py [--out DIR] [--seed N]

The output directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.model.v1`` (what vLLM's ``--tokenizer-mode mistral`` loads) and
``build-info.json``. A second run with the same config, seed and tokenizer file is a no-op.

``head_dim`` is 32 because vLLM's CPU attention needs at least 32: with 16 the server starts and
answers /health, then dies on the first request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parents[1] / ".cache" / "models" / "tiny-mixtral"
DEFAULT_SEED = 0
BUILD_INFO = "build-info.json"
# Bump when the build changes in a way the config hash cannot see (weight init, file layout).
BUILD_FORMAT = 1

# Mixtral 8x7B Instruct v0.1 uses Mistral's v1 SentencePiece tokenizer (32,000 tokens, BOS 1,
# EOS 2); mistral-common ships it as data/tokenizer.model.v1.
TOKENIZER_FILE = "tokenizer.model.v1"
VOCAB_SIZE = 32000
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}


def mistral_tokenizer_path() -> Path:
    """The v1 tokenizer file inside the installed ``mistral-common`` package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILE
    if not path.is_file():
        raise SystemExit(f"mistral-common has no {TOKENIZER_FILE} at {path}; reinstall it")
    return path


def build_hash(seed: int, tokenizer_sha256: str) -> str:
    recipe = {"format": BUILD_FORMAT, "seed": seed, "shape": MODEL_SHAPE,
              "tokenizer_sha256": tokenizer_sha256}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def is_built(out: Path, want: str) -> bool:
    try:
        info = json.loads((out / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("hash") == want and all(
        (out / name).is_file() for name in ("config.json", "model.safetensors", TOKENIZER_FILE)
    )


def build(out: Path, seed: int, tokenizer: Path, want: str) -> None:
    import torch
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**MODEL_SHAPE, torch_dtype="float32")
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())

    # Write beside the target and swap in at the end: a killed build never looks finished.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID).save_pretrained(tmp)
    shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    (tmp / BUILD_INFO).write_text(json.dumps(
        {"hash": want, "seed": seed, "parameters": n_params, "shape": MODEL_SHAPE,
         "tokenizer": TOKENIZER_FILE}, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="weight init seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)

    started = time.monotonic()
    out: Path = args.out.resolve()
    tokenizer = mistral_tokenizer_path()
    want = build_hash(args.seed, hashlib.sha256(tokenizer.read_bytes()).hexdigest())
    if not args.force and is_built(out, want):
        print(f"tiny Mixtral already built at {out} (hash {want[:12]})")
        return 0
    build(out, args.seed, tokenizer, want)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"built tiny Mixtral at {out} (hash {want[:12]}, {size_mb:.1f} MB, "
          f"{time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
