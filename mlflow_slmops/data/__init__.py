"""Packaged default data: the evaluation text and QA file that `slmops evaluate` and the sweep use by default."""

from __future__ import annotations

from pathlib import Path

EVAL_TEXT = "eval_text.txt"
QA_FILE = "qa.jsonl"
# Default calibration text of the calibrated presets (GPTQ): prose unlike EVAL_TEXT, so nothing evaluated leaks in.
CALIBRATION_TEXT = "calibration_text.txt"


def path(name: str) -> Path:
    """The path of a packaged data file, for example ``path(EVAL_TEXT)``."""
    return Path(__file__).resolve().parent / name
