"""Run wrk pinned to one core with a POST body, and read its result as numbers.

A generated Lua script carries the body and headers and prints one JSON line in `done`, so
nothing depends on parsing wrk's human-readable report.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

RESULT_MARK = "WRK_RESULT "
_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "non2xx": %%d, "errors": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d}\\n', summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    non2xx: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(tmp: Path, url: str, body: bytes, key: str | None, connections: int,
            seconds: float, cpu: str) -> WrkResult:
    text = body.decode()
    assert "]==]" not in text
    script = tmp / "post.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script.write_text(_SCRIPT % {"body": text, "auth": auth, "mark": RESULT_MARK})
    duration = max(1, round(seconds))
    out = subprocess.run(
        ["taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
         "--timeout", "10s", "-s", str(script), f"{url}/v1/chat/completions"],
        capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(RESULT_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    data = json.loads(line[len(RESULT_MARK):])
    return WrkResult(requests=data["requests"], seconds=data["duration_us"] / 1e6,
                     non2xx=data["non2xx"], errors=data["errors"],
                     p50_ms=data["p50_us"] / 1e3, p99_ms=data["p99_us"] / 1e3)


def start_wrk(tmp: Path, url: str, body: bytes, key: str | None, connections: int,
              seconds: float, cpu: str, name: str) -> subprocess.Popen[str]:
    """wrk in the background (load while a profiler samples); read nothing back."""
    script = tmp / f"{name}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script.write_text(_SCRIPT % {"body": body.decode(), "auth": auth, "mark": RESULT_MARK})
    return subprocess.Popen(
        ["taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
         "-s", str(script), f"{url}/v1/chat/completions"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
