"""Calibration text for the calibrated presets (GPTQ): read once, checked against the evaluation data, stored
content-addressed in the conversion cache, and handed to Olive as a data config that replays.

A calibration file is plain text, or a QA JSONL file (its questions, chat messages and expected answers become
the text). The text is stored as ``<cache>/calibration/<sha256>.txt``; Olive's passes read it through the
dataset ``slmops_calibration_text`` that ``convert/olive/calibration_data.py`` registers (the data config's ``user_script``),
which refuses a file whose hash is not the one in the config. So an ``olive_config.json`` names its calibration
data by content, and ``olive run --config`` rebuilds the same variant from it.

Calibration must never be what the sweep evaluates: ``check_disjoint`` refuses a file that is the evaluation
text or the QA file, or shares a passage with either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow_slmops import errors

CALIBRATION_DIRNAME = "calibration"
# Olive data-config name and the dataset convert/olive/calibration_data.py registers.
DATA_CONFIG_NAME = "slmops_calibration"
DATASET_TYPE = "slmops_calibration_text"
# One calibration sample: this many consecutive tokens (the tail shorter than MIN_SAMPLE_TOKENS is dropped).
SAMPLE_TOKENS = 128
MIN_SAMPLE_TOKENS = 16
# GPTQ's usual calibration budget; a longer file is cut at this many samples.
MAX_SAMPLES = 128
# A passage (a line of at least this many characters, whitespace-normalized) shared with the evaluation data
# counts as overlap.
MIN_SHARED_CHARS = 40
_HINT = "pass --calibration with text that is not the evaluation text or QA file (for example training data)"


@dataclass(frozen=True)
class Calibration:
    """The calibration text of one sweep or conversion: where it came from and its content-addressed copy."""

    source: str  # the file the user passed, or the packaged default
    path: str  # the stored copy, <cache>/calibration/<sha256>.txt
    sha256: str
    chars: int

    def to_dict(self) -> dict:
        return asdict(self)


def read_calibration_text(path: str | Path) -> str:
    """The text of a calibration file: plain text, or the questions and answers of a QA JSONL file."""
    from mlflow_slmops.measure import quality

    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return "\n".join(_qa_text(item) for item in quality.load_qa(path)) + "\n"
    return quality._read_text_file(path, "calibration file", "pass a plain-text file of a few thousand words")


def _qa_text(item) -> str:
    parts = [m["content"] for m in item.messages] if item.messages else [item.prompt]
    expected = item.expected if isinstance(item.expected, str) else json.dumps(item.expected, ensure_ascii=False)
    return "\n".join([*parts, expected])


def default_calibration_path() -> Path:
    from mlflow_slmops import data

    return data.path(data.CALIBRATION_TEXT)


def prepare(source: str | Path | None, cache_root: str | Path) -> Calibration:
    """Read a calibration file (None: the packaged default) and store its text in the cache by its sha256."""
    source_path = Path(source) if source else default_calibration_path()
    text = read_calibration_text(source_path)
    body = text.encode("utf-8")
    sha = hashlib.sha256(body).hexdigest()
    folder = Path(cache_root) / CALIBRATION_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    stored = folder / f"{sha}.txt"
    if not stored.is_file():
        from mlflow_slmops._files import write_bytes_atomic

        write_bytes_atomic(stored, body)
    return Calibration(str(source_path.resolve()), str(stored), sha, len(text))


def passages(text: str) -> set[str]:
    """The lines of a text long enough to count as a shared passage, whitespace-normalized."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return {line for line in lines if len(line) >= MIN_SHARED_CHARS}


def check_disjoint(calibration_source: str | Path | None, eval_text_path: str | Path,
                   qa_path: str | Path) -> None:
    """Refuse calibration data that is, or shares a passage with, the evaluation text or the QA file.

    Raises:
        SlmopsError: naming the calibration file, what it overlaps with, and a line they share.
    """
    from mlflow_slmops.measure import quality

    cal_path = Path(calibration_source) if calibration_source else default_calibration_path()
    cal_text = read_calibration_text(cal_path)
    cal_passages = passages(cal_text)
    for what, path, text in (("evaluation text", eval_text_path, quality.read_eval_text(eval_text_path)),
                             ("QA file", qa_path, read_calibration_text(qa_path))):
        same_file = Path(path).resolve() == cal_path.resolve()
        shared = sorted(passages(text) & cal_passages)
        if same_file or " ".join(cal_text.split()) == " ".join(text.split()) or shared:
            how = "is" if same_file or not shared else f"shares {len(shared)} passage(s) with"
            example = f" (first: {shared[0][:60]!r})" if shared else ""
            raise errors.SlmopsError(
                f"calibration file {cal_path} {how} the {what} {path}{example}: calibrating on what the "
                "sweep evaluates would make the quality metrics of the calibrated variants look better than they are",
                _HINT,
            )


def sample_ids(text: str, tokenizer) -> list[list[int]]:
    """The calibration samples: consecutive SAMPLE_TOKENS-token chunks of the text, at most MAX_SAMPLES."""
    ids = tokenizer(text, verbose=False)["input_ids"]  # one long text: no "longer than the maximum" warning
    chunks = [ids[i:i + SAMPLE_TOKENS] for i in range(0, len(ids), SAMPLE_TOKENS)]
    return [c for c in chunks if len(c) >= MIN_SAMPLE_TOKENS][:MAX_SAMPLES]


def count_samples(calibration: Calibration, model_dir: str | Path, trust_remote_code: bool = False) -> int:
    """How many samples Olive's passes calibrate on: the number logged as calibration_samples."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return len(sample_ids(Path(calibration.path).read_text(encoding="utf-8"), tokenizer))


def olive_data_config(calibration: Calibration, model_dir: str | Path, trust_remote_code: bool = False) -> dict:
    """The Olive data config of a calibrated pass: the stored text, named by path and sha256."""
    script = Path(__file__).resolve().parent / "convert" / "olive" / "calibration_data.py"
    return {
        "name": DATA_CONFIG_NAME,
        "user_script": str(script),
        "load_dataset_config": {"type": DATASET_TYPE, "params": {
            "path": calibration.path, "sha256": calibration.sha256, "model_path": str(Path(model_dir).resolve()),
            "trust_remote_code": trust_remote_code}},
        "pre_process_data_config": {"type": "skip_pre_process"},
        "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": 1}},
    }
