"""The post-build check: a complete genai folder with a ``logits`` output that loads and generates, in a
subprocess (a model that crashes onnxruntime-genai must not take the sweep down)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow_slmops import errors
from mlflow_slmops.convert import recipe
from mlflow_slmops.genai import modeldir
from mlflow_slmops.variants import VariantSpec

# Files Olive writes into a workflow's output_dir that are not part of the model.
OLIVE_CLUTTER = ("footprint.json", "output_footprint.json", "input_model_footprint.json", "run_history.txt",
                 "model_config.json")


# Tokens the post-build check generates.
VALIDATE_NEW_TOKENS = 4


VALIDATE_TIMEOUT_S = 900


PUBLISHED_FILE_MODE = 0o644


# How often a validation wait checks whether the conversion was interrupted.
CANCEL_POLL_S = 0.2


# Run inside a fresh interpreter: a model that crashes onnxruntime-genai must not take the sweep down.
VALIDATE_SCRIPT = r"""
import json, sys
import onnxruntime_genai as og
path, n_new = sys.argv[1], int(sys.argv[2])
model = og.Model(path)
tokenizer = og.Tokenizer(model)
prompt = tokenizer.encode("Hello")
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + n_new, min_length=len(prompt) + n_new)
gen = og.Generator(model, params)
gen.append_tokens(prompt)
new = []
while not gen.is_done():
    gen.generate_next_token()
    new.append(int(gen.get_next_tokens()[0]))
print(json.dumps({"new_tokens": new}))
"""


def clean_genai_dir(folder: Path) -> None:
    for name in OLIVE_CLUTTER:
        (folder / name).unlink(missing_ok=True)
    for path in folder.rglob("*"):
        if path.is_file():
            # Some Olive passes write 0600 temp files; a model folder is meant to be shared and served.
            path.chmod(PUBLISHED_FILE_MODE)


def _graph_outputs(folder: Path) -> list[str]:
    import onnx

    cfg = modeldir.read_genai_config(folder)
    model = onnx.load(str(folder / cfg["model"]["decoder"]["filename"]), load_external_data=False)
    return [o.name for o in model.graph.output]


def validate_genai_dir(folder: str | Path, spec: VariantSpec,
                       cancel: threading.Event | None = None) -> tuple[dict, str]:
    """Check a built variant: a complete genai folder with a ``logits`` output that loads and generates.

    Returns the validation record and the weights' sha256. The load-and-generate check runs in a subprocess;
    the weights are hashed here meanwhile, on the other core. Build-only variants (their execution provider
    is not on this machine) get the folder checks only. Raises SlmopsError with what failed, and
    ``Cancelled`` (the subprocess killed) once ``cancel`` is set.
    """
    folder = Path(folder)
    modeldir.check_genai_dir(folder)
    outputs = _graph_outputs(folder)
    if recipe.LOGITS not in outputs:
        raise errors.SlmopsError(f"{folder}: the model has no {recipe.LOGITS!r} output "
                                 f"(outputs: {', '.join(outputs[:3])}...), so onnxruntime-genai cannot load it",
                                 "rename the output back to logits")
    if spec.build_only:
        return ({"loaded": False, "reason": f"{spec.execution_provider} is not available on this machine"},
                modeldir.weights_hash(folder))
    proc = subprocess.Popen([sys.executable, "-c", VALIDATE_SCRIPT, str(folder), str(VALIDATE_NEW_TOKENS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        weights_sha256 = modeldir.weights_hash(folder)
        out, err = _communicate(proc, cancel)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise errors.SlmopsError(f"{folder} does not load or generate with onnxruntime-genai: {last}",
                                 "check the variant's Olive passes")
    new_tokens = json.loads(out.strip().splitlines()[-1])["new_tokens"]
    if not new_tokens:
        raise errors.SlmopsError(f"{folder} loads but generated no tokens", "check the variant's Olive passes")
    return {"loaded": True, "new_tokens": len(new_tokens)}, weights_sha256


class Cancelled(BaseException):
    """The conversion this work belonged to was interrupted (Ctrl-C): stop, clean up, publish nothing."""


def raise_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def _communicate(proc: subprocess.Popen, cancel: threading.Event | None) -> tuple[str, str]:
    """proc.communicate(), given up (and raised as Cancelled) as soon as cancel is set."""
    deadline = time.monotonic() + VALIDATE_TIMEOUT_S
    while True:
        raise_if_cancelled(cancel)
        try:
            return proc.communicate(timeout=CANCEL_POLL_S if cancel is not None else VALIDATE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise
