"""Run a measuring stage in a fresh Python subprocess and read back its JSON.

The benchmark and the quality evaluation each run one variant per subprocess, so a variant's memory
figures belong to it alone and a native crash cannot take the caller down. The worker talks back on
stdout, one JSON object a line: ``{"event": "progress", ...}`` for progress bars and any other event
the stage defines; its result (or its user error) goes to the JSON file named by ``--json``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow_slmops._files import write_json_atomic
from mlflow_slmops.errors import SlmopsError

# Called with (task description, completed, total) as a worker makes progress.
ProgressFn = Callable[[str, float, float], None]
# Called with every event the worker emits (progress included).
EventFn = Callable[[dict], None]

_EVENT_PREFIX = "@@slmops "
# How much of the worker's stderr to keep for an error message.
_STDERR_TAIL_LINES = 40
# The last line of a Python traceback: "RuntimeError: ...", "onnxruntime.SomeError: ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*:")


def emit(event: str, **fields: Any) -> None:
    """Worker side: send one event to the parent."""
    sys.stdout.write(_EVENT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def emit_progress(task: str, completed: float, total: float) -> None:
    emit("progress", task=task, completed=completed, total=total)


def write_result(path: str | Path, payload: dict) -> None:
    """Worker side: write the result (or ``{"error": ..., "hint": ...}``) for the parent."""
    write_json_atomic(path, payload)


def run_guarded(main: Callable[[], dict], json_out: str) -> int:
    """Worker side: run main(); write its dict, or the SlmopsError as an error payload. Returns the exit code."""
    try:
        write_result(json_out, main())
        return 0
    except SlmopsError as exc:
        write_result(json_out, {"error": exc.detail, "hint": exc.hint})
        return 1


@dataclass
class WorkerOutcome:
    """What a worker left behind: its result (None if it died), exit code and stderr tail."""

    result: dict | None
    returncode: int
    stderr_tail: list[str] = field(default_factory=list)

    def last_error_line(self) -> str:
        """The worker's last exception (with its continuation lines) as one line, else its last stderr line."""
        lines = [ln.strip() for ln in self.stderr_tail if ln.strip()]
        if not lines:
            return f"exit code {self.returncode}"
        starts = [i for i, ln in enumerate(lines) if _EXCEPTION_LINE.match(ln)]
        return " ".join(lines[starts[-1]:]) if starts else lines[-1]


def run_worker(module: str, args: list[str], on_event: EventFn | None = None,
               timeout_s: float | None = None) -> WorkerOutcome:
    """Run ``python -m module args --json TMP`` and stream its events to on_event.

    Args:
        module: the worker module, for example ``mlflow_slmops.benchmark``.
        args: worker arguments, without ``--json``.
        on_event: called with each event dict as it arrives.
        timeout_s: kill the worker after this many seconds (None: no limit).
    """
    with tempfile.TemporaryDirectory(prefix="slmops-worker-") as tmp:
        out = Path(tmp) / "result.json"
        err_path = Path(tmp) / "stderr.txt"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--json", str(out)],
                stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
            )
            try:
                _pump_events(proc, on_event, timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        tail = err_path.read_text(errors="replace").splitlines()[-_STDERR_TAIL_LINES:]
        result = json.loads(out.read_text()) if out.is_file() else None
        return WorkerOutcome(result, proc.returncode, tail)


def _pump_events(proc: subprocess.Popen, on_event: EventFn | None, timeout_s: float | None) -> None:
    import threading

    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer:
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(_EVENT_PREFIX) or on_event is None:
                continue
            try:
                on_event(json.loads(line[len(_EVENT_PREFIX):]))
            except json.JSONDecodeError:
                continue
    finally:
        if timer:
            timer.cancel()


def progress_events(on_progress: ProgressFn | None) -> EventFn:
    """An event handler that forwards progress events to on_progress and ignores the rest."""

    def handle(event: dict) -> None:
        if on_progress is not None and event.get("event") == "progress":
            on_progress(event["task"], event["completed"], event["total"])

    return handle


def raise_for_outcome(outcome: WorkerOutcome, what: str) -> dict:
    """Return the worker's result, or raise SlmopsError with its user error or its last stderr line."""
    if outcome.result is not None and "error" in outcome.result:
        raise SlmopsError(outcome.result["error"], outcome.result.get("hint"))
    if outcome.returncode != 0 or outcome.result is None:
        raise SlmopsError(
            f"{what} failed in its worker process (exit code {outcome.returncode}): {outcome.last_error_line()}",
            "run it again with the same model folder; if it repeats, re-export the model",
        )
    return outcome.result


@contextmanager
def rich_progress(enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A ProgressFn drawing one rich progress bar per task description (on stderr).

    Example:
        >>> with rich_progress() as on_progress:              # doctest: +SKIP
        ...     run_benchmark("out/int4", on_progress=on_progress)
    """
    from mlflow_slmops.progress import make_progress

    tasks: dict[str, int] = {}
    with make_progress(enabled) as progress:

        def update(task: str, completed: float, total: float) -> None:
            if task not in tasks:
                tasks[task] = progress.add_task(task, total=total)
            progress.update(tasks[task], completed=completed, total=total)

        yield update
