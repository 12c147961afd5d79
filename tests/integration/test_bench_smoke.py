"""The benchmark still runs end to end (`bench/gateway_bench.py --smoke`): it starts its
upstream, Redis prefix, gateways and wrk, and prints the table with sane numbers. Speed is
judged by the benchmark itself, never here: no timing assertions."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_SECONDS = 600


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_bench_smoke_prints_the_table() -> None:
    done = subprocess.run([sys.executable, "bench/gateway_bench.py", "--smoke"], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_SECONDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "| measure | direct | gateway | gateway vs direct | target |" in out
    for row in ("non-stream requests/s", "gateway CPU ms / non-stream request",
                "gateway CPU ms / stream", "idle p50 ms", "stream time to first byte p50 ms",
                "requests/s, 2 workers"):
        assert row in out, row
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH_RESULT "))
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    assert result["errors"] == 0
    for name in ("json_rps_direct", "json_rps_gateway", "sse_rps_direct", "sse_rps_gateway",
                 "w1_rps", "w2_rps"):
        assert result[name] > 0, name
    for name in ("json_cpu_ms", "sse_cpu_ms", "json_p50_gateway_ms", "ttfb_p50_gateway_ms",
                 "idle_p50_gateway_ms"):
        assert math.isfinite(result[name]) and result[name] > 0, name
    assert result["access_log_lines"] > 0  # the full feature path ran, JSON access log included
