"""Shared test helpers: real subprocess CLIs, free ports, waiting for servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """A console script installed beside this interpreter (slmops, mlflow)."""
    return str(VENV_BIN / name)


def run_cli(args: list[str], env: dict | None = None, timeout: float = 600, cwd: str | None = None,
            input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run a real CLI as a subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd,
                          input=input_text)


def slmops(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli([bin_path("slmops"), *args], **kw)


def mlflow_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli([bin_path("mlflow"), *args], **kw)


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = SERVER_START_TIMEOUT_S) -> None:
    """Wait until url answers any HTTP status, or fail with the server's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out[-3000:]}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server started with start_new_session=True, its whole process group."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, no traceback, and an Error line naming what it must."""
    assert result.returncode != 0, f"expected failure, got 0: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error")]
    assert lines, f"no Error line in stderr: {result.stderr!r}"
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime, to prove nothing changed."""
    snap = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st = p.stat()
            snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return snap
