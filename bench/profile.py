"""Where the gateway's CPU goes: py-spy samples one worker under wrk load, and the collapsed
stacks are folded into inclusive shares per function (`--profile` of gateway_bench.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.wrk import start_wrk

# Frames worth naming in the breakdown: our code and the libraries on the request path.
INTERESTING = ("gateway/", "starlette/", "fastapi/", "aiohttp/", "pydantic", "mistral_common",
               "logging/", "prometheus_client", "uvicorn/", "redis/", "orjson", "httptools")


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def record(tmp: Path, pid: int, url: str, body: bytes, key: str, seconds: float,
           wrk_cpu: str, name: str) -> Path:
    exe = py_spy()
    if exe is None:
        raise SystemExit("bench: --profile needs py-spy (.venv/bin/pip install py-spy)")
    out = tmp / f"{name}.collapsed"
    load = start_wrk(tmp, url, body, key, 16, seconds + 2, wrk_cpu, name)
    try:
        subprocess.run([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                        "--rate", "500", "--function", "--format", "raw", "--nonblocking", "--output",
                        str(out)], check=True, capture_output=True, timeout=seconds + 60)
    finally:
        load.wait()
    return out


def breakdown(collapsed: Path, top: int = 25) -> str:
    """Inclusive share of every interesting function (each counted once per stack)."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        seen = set()
        for frame in frames:
            if any(mark in frame for mark in INTERESTING) and frame not in seen:
                seen.add(frame)
                inclusive[_short(frame)] += n
        self_time[_short(frames[-1])] += n
    lines = [f"{total} samples; inclusive % (a frame and everything it calls):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines.append("self % (the innermost frame):")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_time.most_common(top // 2)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`."""
    for mark in ("site-packages/", "/work/main/", "python3.11/"):
        if mark in frame:
            head, _, tail = frame.partition(mark)
            name = head.split(" (")[0]
            return f"{name} ({tail}"
    return frame
