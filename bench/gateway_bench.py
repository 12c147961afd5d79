"""The gateway's own cost, measured against calling the upstream directly, in one run.

    make bench                       # or: .venv/bin/python bench/gateway_bench.py
    .venv/bin/python bench/gateway_bench.py --smoke    # a few seconds: proves it still works

A static upstream (nginx: a fixed completion and a fixed 20-chunk SSE stream; the simulator
when nginx is absent), Redis (the local one under a unique key prefix, deleted afterwards;
else a private `redis-server`), the gateway with the full feature path (key auth, Redis
limits, usage ledger, metrics, JSON access log to a file) and one worker pinned to core 0,
wrk pinned to core 1. Direct and gateway runs alternate, several rounds; medians are
reported. The gateway's CPU per request comes from /proc utime+stime: unlike wall time it
holds still on a machine busy with other work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import profile
from bench import upstream as static
from bench.report import summarize, table
from bench.wrk import WrkResult, run_wrk

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
START_TIMEOUT_SECONDS = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for a French bakery."},
    {"role": "user", "content": "What is the difference between a croissant and a pain au "
                                "chocolat? Answer in two sentences."},
    {"role": "assistant", "content": "A croissant is a plain crescent of laminated dough; a "
                                     "pain au chocolat is the same dough rolled around chocolate."},
    {"role": "user", "content": "And which one keeps better until the next morning?"},
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and every live descendant (uvicorn's workers)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench: process exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit(f"bench: {url} did not answer in {START_TIMEOUT_SECONDS:g} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    key: str

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)


def gateway_config(up: static.StaticUpstream, store: str) -> dict[str, Any]:
    model = {"upstream_model": static.UPSTREAM_MODEL, "default_max_tokens": 64,
             "tokenizer": "mistral-v1"}
    huge = 10**12
    return {
        "store": store,
        "models": {"bench-json": {**model, "replicas": [up.json_url]},
                   "bench-sse": {**model, "replicas": [up.sse_url]}},
        "plans": {"bench": {"rpm": huge, "tpm": huge, "max_concurrent": 10**6,
                            "monthly_tokens": huge * 1000,
                            "models": ["bench-json", "bench-sse"]}},
    }


def spawn_gateway(tmp: Path, config: dict[str, Any], cpus: str,
                  workers: int) -> tuple[str, subprocess.Popen[bytes], Path]:
    port = free_port()
    conf = tmp / f"gateway-{port}.yaml"
    conf.write_text(yaml.safe_dump(config))
    log = tmp / f"gateway-{port}.log"  # the JSON access log (stderr)
    env = {**os.environ, "PLATEFORME_ADMIN_TOKEN": ADMIN_TOKEN, "PLATEFORME_LOG_FORMAT": "json",
           "PLATEFORME_LOG_LEVEL": "INFO"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if workers > 1:
        prom = tmp / f"prom-{port}"
        prom.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, sys.executable, "-m", "deploy.cli", "gateway", "serve",
         "--config", str(conf), "--port", str(port), "--workers", str(workers)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    return f"http://127.0.0.1:{port}", proc, log


def start_minimal_proxy(tmp: Path, up: static.StaticUpstream, cpus: str) -> Gateway:
    port = free_port()
    log = tmp / f"minimal-{port}.log"
    env = {**os.environ, "BENCH_UPSTREAM_JSON": up.json_url, "BENCH_UPSTREAM_SSE": up.sse_url}
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, sys.executable, "-m", "uvicorn", "bench.minimal_proxy:app",
         "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
         "--log-level", "warning"], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
        cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/health", proc, log)
    return Gateway(url, proc, "unused")


def start_gateways(tmp: Path, config: dict[str, Any],
                   specs: list[tuple[str, int]]) -> list[Gateway]:
    """Start gateways (cpus, workers) at once (tokenizers take seconds to load), then issue
    one key through the first: they share the store, so it works on all of them."""
    spawned = [spawn_gateway(tmp, config, cpus, workers) for cpus, workers in specs]
    for url, proc, log in spawned:
        wait_ready(f"{url}/health", proc, log)
    created = httpx.post(f"{spawned[0][0]}/admin/v1/keys",
                         json={"owner": "bench@example.com", "plan": "bench"},
                         headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    created.raise_for_status()
    return [Gateway(url, proc, created.json()["key"]) for url, proc, _ in spawned]


@contextmanager
def redis_store(tmp: Path) -> Iterator[str]:
    """The local Redis under a fresh prefix (only those keys deleted after), else a private
    redis-server."""
    proc = None
    base = LOCAL_REDIS
    try:
        redis.Redis.from_url(base, socket_timeout=1).ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("bench: no Redis on 127.0.0.1:6379 and no redis-server to start")
        port = free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                redis.Redis.from_url(base).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
    prefix = f"bench:{uuid.uuid4().hex}:"
    try:
        yield f"{base}?prefix={prefix}"
    finally:
        client = redis.Redis.from_url(base)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
        client.close()
        if proc is not None:
            stop(proc)


def chat_body(model: str, stream: bool) -> bytes:
    return orjson.dumps({"model": model, "messages": MESSAGES, "max_tokens": 64,
                         "temperature": 0.7, "stream": stream})


def ttfb_once(url: str, body: bytes, key: str | None) -> float:
    """Seconds from sending the request to the first SSE `data:` byte (connect excluded)."""
    host, port = url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{auth}"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(request)
        seen = b""
        while b"data:" not in seen:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"no SSE data from {url}: {seen[:200]!r}")
            seen += chunk
        first = time.perf_counter() - started
        while sock.recv(65536):
            pass
    return first


@dataclass
class Plan:
    rounds: int
    seconds: float
    idle_seconds: float
    connections: int
    ttfb_requests: int


FULL = Plan(rounds=3, seconds=6.0, idle_seconds=3.0, connections=16, ttfb_requests=200)
SMOKE = Plan(rounds=1, seconds=1.0, idle_seconds=1.0, connections=4, ttfb_requests=10)


def measure(plan: Plan, gw: Gateway, gw2: Gateway, mini: Gateway, up: static.StaticUpstream,
            tmp: Path, wrk_cpu: str) -> dict[str, Any]:
    """Every measurement, alternating direct and gateway within each round."""
    direct_json = chat_body(static.UPSTREAM_MODEL, False)
    direct_sse = chat_body(static.UPSTREAM_MODEL, True)
    gw_json, gw_sse = chat_body("bench-json", False), chat_body("bench-sse", True)
    runs: dict[str, list[WrkResult]] = {}
    cpu: dict[str, list[float]] = {}

    def record(name: str, gateway: Gateway | None, url: str, body: bytes, conns: int,
               seconds: float) -> None:
        before = gateway.cpu() if gateway else 0.0
        result = run_wrk(tmp, url, body, gateway.key if gateway else None, conns, seconds,
                         wrk_cpu)
        runs.setdefault(name, []).append(result)
        if gateway is not None and result.requests:
            cpu.setdefault(name, []).append((gateway.cpu() - before) / result.requests * 1e3)

    c = plan.connections
    for _ in range(plan.rounds):
        record("direct_json", None, up.json_url, direct_json, c, plan.seconds)
        record("gateway_json", gw, gw.url, gw_json, c, plan.seconds)
        record("minimal_json", mini, mini.url, direct_json, c, plan.seconds)
        record("direct_sse", None, up.sse_url, direct_sse, c, plan.seconds)
        record("gateway_sse", gw, gw.url, gw_sse, c, plan.seconds)
        record("minimal_sse", mini, mini.url, direct_sse, c, plan.seconds)
        record("direct_idle", None, up.json_url, direct_json, 1, plan.idle_seconds)
        record("gateway_idle", gw, gw.url, gw_json, 1, plan.idle_seconds)
        record("minimal_idle", mini, mini.url, direct_json, 1, plan.idle_seconds)
        record("gateway2_json", gw2, gw2.url, gw_json, c, plan.seconds)
        record("gateway1_json", gw, gw.url, gw_json, c, plan.seconds)
    ttfb: dict[str, list[float]] = {"direct": [], "gateway": [], "minimal": []}
    ttfb_once(gw.url, gw_sse, gw.key)  # warm
    for _ in range(plan.ttfb_requests):
        ttfb["direct"].append(ttfb_once(up.sse_url, direct_sse, None))
        ttfb["gateway"].append(ttfb_once(gw.url, gw_sse, gw.key))
        ttfb["minimal"].append(ttfb_once(mini.url, direct_sse, None))
    return {"runs": runs, "cpu": cpu, "ttfb": ttfb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds: it works, no speed")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample the 1-worker gateway with py-spy and print where "
                             "its CPU goes (non-stream and stream)")
    parser.add_argument("--only-profile", action="store_true", help="skip the measurements")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if args.rounds:
        plan.rounds = args.rounds
    if args.seconds:
        plan.seconds = args.seconds
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed (apt-get install wrk)")
    two = (os.cpu_count() or 1) >= 2
    gw_cpu, load_cpu = ("0", "1") if two else ("0", "0")
    tmp = Path(tempfile.mkdtemp(prefix="plateforme-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up = static.start(tmp, free_port(), free_port(), load_cpu)
        procs += up.procs
        wait_ready(f"{up.json_url}/health", up.procs[0], tmp / "nginx.out")
        wait_ready(f"{up.sse_url}/health", up.procs[-1], tmp / "nginx.out")
        with redis_store(tmp) as store:
            try:
                config = gateway_config(up, store)
                gw, gw2 = start_gateways(tmp, config, [(gw_cpu, 1), ("0,1" if two else "0", 2)])
                procs += [gw.proc, gw2.proc]
                mini = start_minimal_proxy(tmp, up, gw_cpu)
                procs.append(mini.proc)
                if args.profile or args.only_profile:
                    for name, model, stream in (("json", "bench-json", False),
                                                ("sse", "bench-sse", True)):
                        out = profile.record(tmp, gw.proc.pid, gw.url, chat_body(model, stream),
                                             gw.key, 2 if args.smoke else 10, load_cpu, name)
                        print(f"## profile: gateway, {name} requests\n{profile.breakdown(out)}\n")
                measured = None if args.only_profile else measure(plan, gw, gw2, mini, up, tmp,
                                                                  load_cpu)
            finally:  # before the prefix is cleaned: settlements drain into it
                for proc in reversed(procs):
                    stop(proc)
        if measured is None:
            return
        summary = summarize(measured, up.kind)
        access_lines = sum(1 for p in tmp.glob("gateway-*.log")
                           for line in p.read_text().splitlines() if '"plateforme.access"' in line)
        summary["access_log_lines"] = access_lines
        print(table(summary, plan))
        print(f"access-log lines written: {access_lines}")
        print("BENCH_RESULT " + orjson.dumps(summary).decode())
    finally:
        for proc in procs:
            stop(proc)
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
