"""deploy.vllm_local: the CPU vLLM command line built from a tier spec's envs (no vLLM needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import vllm_local
from deploy.vllm_local import (
    ModelNotBuilt,
    SpecEnvError,
    VllmLocalError,
    VllmNotInstalled,
    build_command,
    launch_summary,
    tiny_model_path,
    vllm_python,
)

SMALL_ENVS = {
    "MODEL_ID": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "MAX_MODEL_LEN": "32768",
    "TOKENIZER_MODE": "mistral",
    "CONFIG_FORMAT": "auto",
    "LOAD_FORMAT": "auto",
    "GPU_MEMORY_UTILIZATION": "0.90",
    "VLLM_EXTRA_ARGS": "",
    "VLLM_VERSION": "0.11.0",
}


@pytest.fixture
def venv(tmp_path: Path) -> dict[str, str]:
    """An environ pointing at a fake venv that has a bin/python."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    return {"PLATEFORME_VLLM_VENV": str(tmp_path / "venv")}


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    (model / "model.safetensors").write_bytes(b"")
    return model


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def test_runs_the_api_server_module_of_the_venv_python(venv: dict[str, str]) -> None:
    argv, _ = build_command(SMALL_ENVS, 8123, environ=venv)
    assert argv[:3] == [venv["PLATEFORME_VLLM_VENV"] + "/bin/python", "-m",
                        "vllm.entrypoints.openai.api_server"]
    assert "serve" not in argv


def test_serves_the_spec_model_id_with_its_serving_flags(venv: dict[str, str]) -> None:
    argv, _ = build_command(SMALL_ENVS, 8123, environ=venv)
    assert flag_value(argv, "--model") == SMALL_ENVS["MODEL_ID"]
    assert flag_value(argv, "--served-model-name") == SMALL_ENVS["MODEL_ID"]
    assert flag_value(argv, "--tokenizer-mode") == "mistral"
    assert flag_value(argv, "--config-format") == "auto"
    assert flag_value(argv, "--load-format") == "auto"
    assert flag_value(argv, "--max-model-len") == "32768"
    assert "--enable-prefix-caching" in argv


def test_cpu_overrides_and_loopback_binding(venv: dict[str, str]) -> None:
    argv, env = build_command(SMALL_ENVS, 8123, environ=venv)
    assert "--enforce-eager" in argv
    assert flag_value(argv, "--distributed-executor-backend") == "uni"
    assert flag_value(argv, "--kv-cache-memory-bytes") == "67108864"
    assert flag_value(argv, "--dtype") == "float32"
    assert flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--port") == "8123"
    assert env == {
        "OMP_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }


def test_gpu_only_settings_never_reach_the_cpu_command(venv: dict[str, str]) -> None:
    envs = dict(SMALL_ENVS, VLLM_EXTRA_ARGS=(
        "--tensor-parallel-size 2 --gpu-memory-utilization=0.9 --enable-expert-parallel "
        "--kv-cache-dtype fp8 -tp 4 --max-num-seqs 16 --dtype bfloat16 --host 0.0.0.0"))
    argv, _ = build_command(envs, 8123, environ=venv)
    joined = " ".join(argv)
    for gpu_only in ("tensor-parallel", "-tp", "gpu-memory", "expert-parallel", "fp8",
                     "bfloat16", "0.0.0.0", "0.9"):
        assert gpu_only not in joined
    assert flag_value(argv, "--max-num-seqs") == "16"  # harmless extras pass through
    assert flag_value(argv, "--dtype") == "float32"
    assert flag_value(argv, "--host") == "127.0.0.1"


def test_extra_args_can_override_serving_defaults(venv: dict[str, str]) -> None:
    envs = dict(SMALL_ENVS, VLLM_EXTRA_ARGS="--tokenizer-mode auto --no-enable-prefix-caching")
    argv, _ = build_command(envs, 8123, environ=venv)
    assert flag_value(argv, "--tokenizer-mode") == "auto"
    assert "--enable-prefix-caching" not in argv


def test_tokenizer_mode_defaults_to_mistral(venv: dict[str, str]) -> None:
    argv, _ = build_command({"MODEL_ID": "m"}, 8123, environ=venv)
    assert flag_value(argv, "--tokenizer-mode") == "mistral"
    assert "--max-model-len" not in argv
    assert "--config-format" not in argv


def test_local_model_keeps_the_served_name_and_caps_the_context(
    venv: dict[str, str], tiny_model: Path
) -> None:
    argv, _ = build_command(SMALL_ENVS, 8123, model_path=str(tiny_model), environ=venv)
    assert flag_value(argv, "--model") == str(tiny_model)
    assert flag_value(argv, "--served-model-name") == SMALL_ENVS["MODEL_ID"]
    assert flag_value(argv, "--max-model-len") == "4096"
    # The tiny model is HF format whatever the spec's weights are: vLLM detects it.
    assert "--config-format" not in argv and "--load-format" not in argv


def test_shorter_spec_context_is_kept_for_a_local_model(
    venv: dict[str, str], tiny_model: Path
) -> None:
    envs = dict(SMALL_ENVS, MAX_MODEL_LEN="1024")
    argv, _ = build_command(envs, 8123, model_path=str(tiny_model), environ=venv)
    assert flag_value(argv, "--max-model-len") == "1024"


def test_api_key_goes_in_the_environment_not_argv(venv: dict[str, str]) -> None:
    envs = dict(SMALL_ENVS, VLLM_API_KEY="sk-replica-secret")
    argv, env = build_command(envs, 8123, environ=venv)
    assert env["VLLM_API_KEY"] == "sk-replica-secret"
    assert "--api-key" not in argv
    assert all("sk-replica-secret" not in a for a in argv)
    assert "sk-replica-secret" not in launch_summary(argv, env)


def test_no_api_key_means_none_in_env(venv: dict[str, str]) -> None:
    _, env = build_command(SMALL_ENVS, 8123, environ=venv)
    assert "VLLM_API_KEY" not in env


@pytest.mark.parametrize(
    ("envs", "port", "needle"),
    [
        ({}, 8000, "MODEL_ID"),
        ({"MODEL_ID": "  "}, 8000, "MODEL_ID"),
        ({"MODEL_ID": "m", "MAX_MODEL_LEN": "32k"}, 8000, "MAX_MODEL_LEN"),
        ({"MODEL_ID": "m", "MAX_MODEL_LEN": "0"}, 8000, "MAX_MODEL_LEN"),
        ({"MODEL_ID": "m", "VLLM_EXTRA_ARGS": "--foo 'unclosed"}, 8000, "VLLM_EXTRA_ARGS"),
        ({"MODEL_ID": "m"}, 0, "port"),
        ({"MODEL_ID": "m"}, 70000, "port"),
    ],
)
def test_bad_spec_envs_are_named(
    venv: dict[str, str], envs: dict[str, str], port: int, needle: str
) -> None:
    with pytest.raises(SpecEnvError, match=needle):
        build_command(envs, port, environ=venv)


def test_missing_venv_names_the_setup_command(tmp_path: Path) -> None:
    environ = {"PLATEFORME_VLLM_VENV": str(tmp_path / "nope")}
    with pytest.raises(VllmNotInstalled, match="scripts/setup-vllm.sh") as info:
        vllm_python(environ)
    assert str(tmp_path / "nope") in str(info.value)
    with pytest.raises(VllmLocalError):
        build_command(SMALL_ENVS, 8000, environ=environ)


def test_venv_default_is_under_the_repo_cache() -> None:
    assert vllm_local.vllm_venv({}) == vllm_local.REPO_ROOT / ".cache" / "vllm-venv"
    assert vllm_local.vllm_venv({"PLATEFORME_VLLM_VENV": "rel/venv"}) == (
        vllm_local.REPO_ROOT / "rel" / "venv")


def test_missing_model_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(ModelNotBuilt, match="build_tiny_mixtral.py"):
        tiny_model_path({"PLATEFORME_TINY_MODEL": str(tmp_path)})


def test_tiny_model_path_finds_a_built_model(tiny_model: Path) -> None:
    assert tiny_model_path({"PLATEFORME_TINY_MODEL": str(tiny_model)}) == tiny_model


def test_tiny_model_dir_defaults_under_the_repo_cache() -> None:
    assert vllm_local.tiny_model_dir({}) == (
        vllm_local.REPO_ROOT / ".cache" / "models" / "tiny-mixtral")


def test_launch_summary_is_shell_pasteable(venv: dict[str, str]) -> None:
    argv, env = build_command(dict(SMALL_ENVS, VLLM_EXTRA_ARGS="--chat-template 'a b'"),
                              8123, environ=venv)
    assert "'a b'" in launch_summary(argv, env)
    assert launch_summary(argv, env).startswith("OMP_NUM_THREADS=1 ")


def test_importing_the_module_loads_nothing_heavy() -> None:
    code = ("import sys, deploy.vllm_local; "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'sky') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=vllm_local.REPO_ROOT)
    assert out.stdout.strip() == "[]"


def test_matches_the_small_tier_spec_if_present(venv: dict[str, str]) -> None:
    """The real sky/small.yaml envs produce a command with its model and tokenizer mode."""
    spec_path = vllm_local.REPO_ROOT / "sky" / "small.yaml"
    if not spec_path.is_file():
        pytest.skip(f"{spec_path} not written yet")
    envs = {k: str(v) for k, v in (yaml.safe_load(spec_path.read_text())["envs"]).items()}
    argv, _ = build_command(envs, 8123, environ=venv)
    assert flag_value(argv, "--served-model-name") == envs["MODEL_ID"]
    assert flag_value(argv, "--tokenizer-mode") == envs.get("TOKENIZER_MODE", "mistral")
