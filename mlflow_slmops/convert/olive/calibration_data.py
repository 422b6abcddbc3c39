"""Olive's side of the calibration data: the ``user_script`` of a calibrated pass's data config.

Importing this file registers the dataset ``slmops_calibration_text`` with Olive's data registry. It reads the
stored calibration text, refuses it unless its sha256 is the one the config names, and yields the samples
``calibration.sample_ids`` cuts, as Olive's GPTQ and RTN passes expect them (``input_ids`` and
``attention_mask``, with a dummy label). Olive imports it by path, so it imports only what Olive has.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from olive.data.registry import Registry


@Registry.register_dataset("slmops_calibration_text")
def slmops_calibration_text(path: str, sha256: str, model_path: str, trust_remote_code: bool = False, **_kwargs):
    import torch
    from transformers import AutoTokenizer

    from mlflow_slmops.calibration import sample_ids

    body = Path(path).read_bytes()
    found = hashlib.sha256(body).hexdigest()
    if found != sha256:
        raise ValueError(f"calibration text {path} has sha256 {found}, the config names {sha256}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    samples = []
    for ids in sample_ids(body.decode("utf-8"), tokenizer):
        tokens = torch.tensor(ids, dtype=torch.long)
        samples.append(({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, torch.tensor(0)))
    return samples
