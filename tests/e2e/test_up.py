"""`plateforme up` as a newcomer runs it: the README's first command (`make up` bootstraps the venv,
then runs `.venv/bin/plateforme up`, which is what runs here).

The printed curl and Python examples are taken from its output and run exactly as printed (the
Python one with this venv's interpreter in place of a leading `python`); Ctrl-C (SIGINT to its
process group, as a terminal sends it) must leave no process it started behind; and a second
`plateforme up` on the same state dir must reuse the same dev key and state.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.fixtures.redis_server import free_port

PLATEFORME = str(Path(sys.executable).with_name("plateforme"))
UP_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 30.0
EXAMPLE_TIMEOUT_SECONDS = 60.0
SIM_MARK = "[plateforme-sim]"


@dataclass
class Up:
    """A running `plateforme up`, its output read by a thread as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_until_up(self) -> str:
        """The banner, once the whole of it (through the Python example) is printed."""
        deadline = time.monotonic() + UP_TIMEOUT_SECONDS
        while not any("from plateforme_client import" in line for line in self.lines):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader drain the last lines
                pytest.fail(f"plateforme up exited with {self.proc.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"plateforme up not up after {UP_TIMEOUT_SECONDS:.0f} s:\n"
                            f"{self.output}")
            time.sleep(0.1)
        assert "Plateforme is up" in self.output
        return self.output

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the foreground process group, then wait for the exit."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"plateforme up still running {STOP_TIMEOUT_SECONDS:.0f} s after "
                        f"Ctrl-C:\n{self.output}")


def start_up(state_dir: Path, port: int) -> Up:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PLATEFORME_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [PLATEFORME, "up", "--state-dir", str(state_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=env, start_new_session=True)  # its own group: the "terminal" Ctrl-C goes to
    up = Up(proc)
    threading.Thread(target=up._read, daemon=True).start()
    return up


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    """Every `plateforme up` the test starts; killed (group and endpoints) if one outlives it."""
    started: list[Up] = []
    yield started
    for up in started:
        if up.proc.poll() is None:
            os.killpg(up.proc.pid, signal.SIGKILL)
            up.proc.wait()


# --- what the banner says ----------------------------------------------------------------------
def field_of(output: str, label: str) -> str:
    match = re.search(rf"^\s*{label}:\s+(\S+)\s*$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1)


def curl_example(output: str) -> str:
    """The printed curl command, continuation lines included, as a user would paste it."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("curl "))
    command = [lines[start]]
    while command[-1].rstrip().endswith("\\"):
        command.append(lines[start + len(command)])
    return "\n".join(command).strip()


def python_example(output: str) -> str:
    """The printed Python one-liner; a leading bare `python` (printed when that is the venv's
    own, i.e. the venv is active) becomes this venv's interpreter, anything else runs as is."""
    line = next(line.strip() for line in output.splitlines()
                if " -c 'from plateforme_client import" in line)
    if line.startswith("python "):
        return shlex.quote(sys.executable) + line[len("python"):]
    return line


def run_shell(command: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLATEFORME_")}
    return subprocess.run(command, shell=True, capture_output=True, text=True, env=env,
                          timeout=EXAMPLE_TIMEOUT_SECONDS, check=False)


# --- processes ---------------------------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (it runs no code and holds no port)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def check_examples(output: str) -> None:
    curl = run_shell(curl_example(output))
    assert curl.returncode == 0, curl.stderr
    completion = json.loads(curl.stdout)
    assert SIM_MARK in completion["choices"][0]["message"]["content"], curl.stdout

    python = run_shell(python_example(output))
    assert python.returncode == 0, python.stderr
    assert python.stdout.startswith(SIM_MARK), python.stdout


def stop_and_check_nothing_left(up: Up, state_dir: Path, port: int) -> None:
    children = descendants(up.proc.pid)
    endpoints = {json.loads(p.read_text())["pid"]
                 for p in (state_dir / "endpoints").glob("*.json")}
    assert len(endpoints) == 2  # one local endpoint per configured model (small, tiny)
    assert endpoints <= children  # it started them itself
    commands = [cmdline(pid) for pid in children]
    assert sum("deploy.sim" in c for c in commands) == 2, commands
    assert sum("gateway serve" in c for c in commands) == 1, commands

    assert up.interrupt() == 0, up.output
    left = sorted(pid for pid in children if not process_gone(pid))
    assert not left, f"still running after Ctrl-C: {[cmdline(pid) for pid in left]}"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert not list((state_dir / "endpoints").glob("*.json"))  # nothing recorded as running


def test_up_examples_ctrl_c_and_second_run(tmp_path: Path, ups: list[Up]) -> None:
    state_dir = tmp_path / "state"
    port = free_port()

    first = start_up(state_dir, port)
    ups.append(first)
    output = first.wait_until_up()
    base_url = field_of(output, "base URL")
    key = field_of(output, "API key")
    assert base_url == f"http://127.0.0.1:{port}"
    assert key.startswith("plf_")
    check_examples(output)
    config = {p.name: p.read_text() for p in state_dir.glob("config.*.yaml")}
    admin_token = (state_dir / "admin_token").read_text()
    stop_and_check_nothing_left(first, state_dir, port)

    # a second run on the same state dir: same key, same config and admin token, same store
    second = start_up(state_dir, port)
    ups.append(second)
    output = second.wait_until_up()
    assert field_of(output, "API key") == key
    assert {p.name: p.read_text() for p in state_dir.glob("config.*.yaml")} == config
    assert (state_dir / "admin_token").read_text() == admin_token
    usage = httpx.get(f"{base_url}/admin/v1/usage", timeout=10,
                      headers={"Authorization": f"Bearer {admin_token.strip()}"})
    assert usage.status_code == 200, usage.text
    rows = usage.json()
    rows = rows if isinstance(rows, list) else rows["data"]
    assert sum(row["requests"] for row in rows) >= 2  # the first run's two example calls
    check_examples(output)
    stop_and_check_nothing_left(second, state_dir, port)
