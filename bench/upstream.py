"""The benchmark's fast static upstream: nginx answering a fixed chat completion on one port
and a fixed 20-chunk SSE stream (with a usage chunk and `[DONE]`) on another.

nginx answers from memory (`return 200 '...'`), so what the benchmark measures is the
gateway, not the model server. Without nginx the simulator (`python -m deploy.sim`, zero
latency) stands in on both ports: slower, so the ratios are then conservative.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

UPSTREAM_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STREAM_CHUNKS = 20
PROMPT_TOKENS = 42
NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def completion_body() -> bytes:
    """What vLLM answers to a non-streaming chat completion (fixed content)."""
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * 20},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": STREAM_CHUNKS,
                  "total_tokens": PROMPT_TOKENS + STREAM_CHUNKS}})


def stream_body() -> bytes:
    """vLLM's SSE shape: 20 content chunks, the usage chunk (empty choices), `[DONE]`."""
    events = []
    for i in range(STREAM_CHUNKS):
        delta = {"role": "assistant", "content": " tok"} if i == 0 else {"content": " tok"}
        events.append({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": UPSTREAM_MODEL, "choices": [{
                "index": 0, "delta": delta, "logprobs": None,
                "finish_reason": "stop" if i == STREAM_CHUNKS - 1 else None}]})
    events.append({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                   "created": 1700000000, "model": UPSTREAM_MODEL, "choices": [],
                   "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": STREAM_CHUNKS,
                             "total_tokens": PROMPT_TOKENS + STREAM_CHUNKS}})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in NGINX_PATHS if Path(p).exists()), None)


def nginx_config(tmp: Path, json_port: int, sse_port: int) -> str:
    """Bodies are files (a `return` string is capped at 4 KiB); the static module refuses
    POST with 405, which `error_page 405 =200 $uri` turns into serving the file."""
    (tmp / "completion.json").write_bytes(completion_body())
    (tmp / "stream.sse").write_bytes(stream_body())
    for readable in (tmp, tmp / "completion.json", tmp / "stream.sse"):
        readable.chmod(0o755)  # nginx's worker runs as an unprivileged user

    def server(port: int, media: str, name: str) -> str:
        return f"""
  server {{
    listen 127.0.0.1:{port};
    location = /v1/chat/completions {{
      default_type {media}; alias {tmp}/{name}; error_page 405 =200 $uri; }}
    location = /metrics {{ default_type text/plain; return 200 ''; }}
    location / {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
  }}"""

    temp = " ".join(f"{d}_temp_path {tmp}/{d};" for d in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  etag off;
  {temp}
  {server(json_port, "application/json", "completion.json")}
  {server(sse_port, "text/event-stream", "stream.sse")}
}}
"""


@dataclass
class StaticUpstream:
    kind: str  # "nginx" or "simulator"
    json_url: str
    sse_url: str
    procs: list[subprocess.Popen[bytes]]


def start(tmp: Path, json_port: int, sse_port: int, cpu: str) -> StaticUpstream:
    """nginx on `cpu` when installed, else one simulator per port."""
    nginx = find_nginx()
    if nginx is not None:
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_config(tmp, json_port, sse_port))
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"),
             "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=(tmp / "nginx.out").open("wb"))
        return StaticUpstream("nginx", f"http://127.0.0.1:{json_port}",
                              f"http://127.0.0.1:{sse_port}", [proc])
    procs = [subprocess.Popen(
        ["taskset", "-c", cpu, sys.executable, "-m", "deploy.sim", "--port", str(port),
         "--model", UPSTREAM_MODEL], stdout=(tmp / f"sim-{port}.log").open("wb"),
        stderr=subprocess.STDOUT) for port in (json_port, sse_port)]
    return StaticUpstream("simulator", f"http://127.0.0.1:{json_port}",
                          f"http://127.0.0.1:{sse_port}", procs)
