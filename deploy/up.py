"""`plateforme up`: the whole platform on one machine, for a newcomer with no GPU, cloud or Redis.

It writes a default config once (state dir, embedded SQLite store), starts one local endpoint
per model through the local launcher (the simulator, or the tiny CPU Mixtral on vLLM with
`--engine vllm`), starts the gateway, registers the endpoints through the admin API exactly as
`deploy up` registers cloud replicas, and prints the base URL, a dev key and examples. A second
run reuses the same state (config, admin token, store, dev key). Ctrl-C stops all it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from deploy.admin import AdminClient, AdminError
from deploy.errors import DeployError
from deploy.launcher import UpOptions
from deploy.local_launcher import LocalLauncher
from deploy.specs import load_spec

GATEWAY_START_TIMEOUT_SECONDS = 60.0
ENDPOINT_START_TIMEOUT_SECONDS = 300.0  # vLLM on a CPU needs 45-150 s; the simulator ~1 s
TINY_VLLM_CONTEXT_WINDOW = 4096  # when neither the spec nor the weights say
TIERS = {"mistral-small": ("small", ["small", "open-mixtral-8x7b"]),
         "mistral-tiny": ("tiny", ["tiny", "open-mistral-7b"])}


class UpError(Exception):
    """`plateforme up` could not start; the message says what to do."""


def vllm_context_window(model_path: str | None) -> int:
    """The context length vLLM serves `small` with here: the spec's, capped at the weights'
    (4,096 positions for the tiny CPU Mixtral), so the gateway refuses what vLLM would."""
    from deploy.vllm_local import VllmLocalError, max_model_len, tiny_model_path

    try:
        weights = model_path or str(tiny_model_path())
    except VllmLocalError as exc:
        raise UpError(str(exc)) from exc
    return max_model_len(load_spec("small").envs, weights) or TINY_VLLM_CONTEXT_WINDOW


def default_config(state_dir: Path, engine: str, model_path: str | None = None
                   ) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, (tier, aliases) in TIERS.items():
        model: dict[str, Any] = {"aliases": aliases,
                                 "upstream_model": load_spec(tier).model_id,
                                 "context_window": 32768, "default_max_tokens": 1024,
                                 "tokenizer": "mistral-v1" if tier == "small" else "mistral-v3"}
        if engine == "vllm" and tier == "small":
            window = vllm_context_window(model_path)
            model.update(context_window=window,  # the tiny CPU Mixtral decodes slowly: short
                         default_max_tokens=128 if model_path is None else min(1024, window))
        models[name] = model
    return {
        "store": f"sqlite:///{state_dir / 'state.db'}",
        "models": models,
        "plans": {
            "dev": {"rpm": 600, "tpm": 2_000_000, "max_concurrent": 64, "models": ["*"]},
            "beta": {"rpm": 60, "tpm": 100_000, "max_concurrent": 8,
                     "monthly_tokens": 10_000_000, "models": list(TIERS)},
        },
    }


def _secret_file(path: Path, make: Any) -> str:
    if path.exists():
        return path.read_text().strip()
    value = str(make())
    path.write_text(value)
    path.chmod(0o600)
    return value


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpError(f"the gateway exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UpError(f"{url} did not answer within {timeout:.0f} s")


def _dev_key(admin: AdminClient, state_dir: Path) -> str:
    """The saved dev key if it still works, else a new one (saved, 0600)."""
    path = state_dir / "dev_key.json"
    if path.exists():
        saved = json.loads(path.read_text())
        try:
            record = admin.get_key(saved["id"])
            if record.get("revoked_at") is None:
                return str(saved["key"])
        except AdminError:
            pass
    created = admin.create_key("dev@localhost", "dev", name="plateforme up dev key")
    path.write_text(json.dumps({"id": created["id"], "key": created["key"]}))
    path.chmod(0o600)
    return str(created["key"])


def python_command() -> str:
    """The interpreter to print in the Python example: this one, which has `plateforme_client`.

    After `make up` the venv is not activated: the `python` on PATH is another interpreter
    without the client, or none at all (Debian ships only `python3`). So the example says
    `python` only when that is this interpreter, else this one's path (relative when short).
    """
    exe = os.path.abspath(sys.executable)
    on_path = shutil.which("python")
    if on_path is not None and os.path.abspath(on_path) == exe:
        return "python"
    relative = os.path.relpath(exe)
    return shlex.quote(relative if not relative.startswith("..") else exe)


def examples(base_url: str, key: str) -> str:
    body = '{"model": "small", "messages": [{"role": "user", "content": "Hello!"}]}'
    return (
        f"  curl {base_url}/v1/chat/completions \\\n"
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        f"    -d '{body}'\n\n"
        f"  {python_command()} -c 'from plateforme_client import Client; "
        f"print(Client(api_key=\"{key}\", base_url=\"{base_url}\").chat(model=\"small\", "
        f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}]).choices[0].message.content)'"
    )


def run_up(*, config: str | None, port: int, state_dir: str, engine: str,
           model_path: str | None = None) -> None:
    if engine not in ("sim", "vllm"):
        raise UpError(f"--engine must be sim or vllm, not {engine!r}")
    if model_path is not None and engine != "vllm":
        raise UpError("--model-path needs --engine vllm")
    state = Path(state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    config_path = Path(config) if config else state / f"config.{engine}.yaml"
    if not config and not config_path.exists():
        config_path.write_text(yaml.safe_dump(default_config(state, engine, model_path),
                                              sort_keys=False))
    catalog = yaml.safe_load(config_path.read_text()) or {}
    admin_token = _secret_file(state / "admin_token", lambda: secrets.token_urlsafe(32))
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PLATEFORME_ADMIN_TOKEN": admin_token}

    launched: list[tuple[LocalLauncher, str, str, str]] = []  # launcher, tier, model, url
    gateway: subprocess.Popen[bytes] | None = None
    admin: AdminClient | None = None
    stop = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        for model in catalog.get("models", {}):
            tier = TIERS.get(model, (None, []))[0]
            if tier is None:
                continue  # a model of the operator's own: its replicas come from the config
            on_vllm = engine == "vllm" and tier == "small"
            launcher = LocalLauncher(state_dir=state / "endpoints",
                                     engine="vllm" if on_vllm else "sim",
                                     model_path=model_path if on_vllm else None)
            print(f"starting the {tier} endpoint ({launcher.engine}) ...", flush=True)
            endpoint = launcher.up(tier, load_spec(tier), UpOptions(
                wait_timeout_seconds=ENDPOINT_START_TIMEOUT_SECONDS, poll_interval_seconds=0.5))
            launched.append((launcher, tier, model, endpoint.url))
        gateway_log = (state / "gateway.log").open("ab")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "gateway", "serve", "--config",
             str(config_path), "--port", str(port)], env=env, stdout=gateway_log,
            stderr=subprocess.STDOUT)
        _wait_http(f"{base_url}/health", GATEWAY_START_TIMEOUT_SECONDS, gateway)
        admin = AdminClient(base_url, admin_token)
        for _, _, model, url in launched:
            for stale in set(admin.list_replicas(model)) - {url}:
                try:
                    admin.deregister_replica(model, stale)
                except AdminError:
                    pass  # a static replica from the config: not ours to remove
            admin.register_replica(model, url)
        key = _dev_key(admin, state)
        print(f"\nPlateforme is up (Ctrl-C stops it).\n\n  base URL:    {base_url}\n"
              f"  API key:     {key}\n  admin token: {state / 'admin_token'}\n"
              f"  gateway log: {state / 'gateway.log'}\n"
              f"  models:      {', '.join(catalog.get('models', {}))}\n\n"
              f"Try it:\n\n{examples(base_url, key)}\n", flush=True)
        while not stop and gateway.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (DeployError, AdminError) as exc:
        raise UpError(str(exc)) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("\nstopping ...", flush=True)
        for _, _, model, url in launched:
            if admin is not None and gateway is not None and gateway.poll() is None:
                try:
                    admin.deregister_replica(model, url)
                except AdminError:
                    pass
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gateway.kill()
        for launcher, tier, _, _ in launched:
            try:
                launcher.down(tier)
            except DeployError:
                pass
        if admin is not None:
            admin.close()
