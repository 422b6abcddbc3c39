"""Deploy write path: `create_deployment` into the Foundry cache (weights hardlinked) against a plain copy.

For each model size, side by side in one run on one filesystem:
- **deploy**: ``FoundryLocalDeploymentClient.create_deployment(name, "models:/NAME/1")`` in this process, the
  whole operation: registry lookup, folder checks, PromptTemplate derivation, staging, hardlinking the
  weights, the atomic rename and the registration in Foundry Local's local catalog;
- **plain copy**: ``shutil.copytree`` of the same model folder, what a deploy without hardlinks must at least do.

The model is a valid genai folder (the tiny Qwen2 fixture model, converted by Olive) whose external-data file
is padded with random bytes to the target size: only the write path is measured, so the weights need not
be meaningful. The artifact store (file store) and the cache sit in one temporary folder, as in a default
local setup. Page cache is warm for both (the files were just written).

Run:  .venv/bin/python benchmarks/bench_deploy.py [--sizes-gb 0.5,1,2] [--repeats 3]
      (writes benchmarks/out/deploy.{json,md})
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
GB = 1_000_000_000
PAD_CHUNK = 64 << 20
MODEL_NAME = "bench-deploy"


def build_genai(work: Path) -> Path:
    """A tiny real genai folder (Olive ModelBuilder fp32 of the Qwen2 toy model)."""
    from devkit.testing import convert_for_tests
    from devkit.toymodel import build_tiny_model

    hf = build_tiny_model(work / "hf", "qwen2")
    return convert_for_tests(hf, work / "genai", "fp32")


def padded_copy(genai: Path, dst: Path, size_bytes: int) -> Path:
    """The genai folder with its external-data file grown to size_bytes (random bytes past the real data)."""
    from mlflow_slmops.genai import modeldir

    shutil.copytree(genai, dst)
    data = next(f for f in modeldir.check_genai_dir(dst).onnx_files if f.endswith(".data"))
    block = os.urandom(PAD_CHUNK)  # incompressible, so no filesystem can shortcut the copy
    with open(dst / data, "ab") as fh:
        while fh.tell() < size_bytes:
            fh.write(block[: min(PAD_CHUNK, size_bytes - fh.tell())])
    return dst


def log_and_register(folder: Path) -> str:
    import mlflow

    from mlflow_slmops import flavor

    with mlflow.start_run():
        info = flavor.log_model(folder, name="model", registered_model_name=MODEL_NAME)
    return f"models:/{MODEL_NAME}/{info.registered_model_version}"


def time_deploy(client, uri: str) -> tuple[float, str]:
    start = time.perf_counter()
    client.create_deployment(MODEL_NAME, uri)
    seconds = time.perf_counter() - start
    mode = client.get_deployment(MODEL_NAME)["link_mode"]
    client.delete_deployment(MODEL_NAME)
    return seconds, mode


def time_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    shutil.copytree(src, dst)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def measure(sizes_gb: list[float], repeats: int, work: Path) -> list[dict]:
    import mlflow
    from mlflow.deployments import get_deploy_client

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    mlflow.set_experiment("bench-deploy")
    genai = build_genai(work)
    client = get_deploy_client(f"foundry-local:{work / 'foundry-cache'}")
    time_deploy(client, log_and_register(genai))  # warm-up: imports, first runtime start
    rows = []
    for size in sizes_gb:
        folder = padded_copy(genai, work / f"model-{size:g}gb", int(size * GB))
        uri = log_and_register(folder)
        artifacts = Path(mlflow.MlflowClient().get_model_version_download_uri(MODEL_NAME, uri.rsplit("/", 1)[1]))
        deploys, copies, modes = [], [], set()
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            seconds, mode = time_deploy(client, uri)
            deploys.append(seconds)
            modes.add(mode)
            copies.append(time_copy(artifacts / "model", work / "plain-copy"))
        shutil.rmtree(folder)
        rows.append({"size_gb": size, "bytes": sum(f.stat().st_size for f in (artifacts / "model").rglob("*")),
                     "link_mode": ",".join(sorted(modes)), "deploy_s": deploys, "copy_s": copies,
                     "deploy_median_s": statistics.median(deploys), "copy_median_s": statistics.median(copies)})
        print(f"{size:g} GB: deploy {rows[-1]['deploy_median_s']:.3f} s ({rows[-1]['link_mode']}), "
              f"plain copy {rows[-1]['copy_median_s']:.3f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| Model size | Deploy (weights hardlinked) | Plain copy of the folder | Copy / deploy |",
             "|---|---|---|---|"]
    for r in rows:
        d, c = r["deploy_s"], r["copy_s"]
        lines.append(f"| {r['bytes'] / GB:.2f} GB | {r['deploy_median_s']:.3f} s ({min(d):.3f}-{max(d):.3f}) "
                     f"| {r['copy_median_s']:.3f} s ({min(c):.3f}-{max(c):.3f}) "
                     f"| {r['copy_median_s'] / r['deploy_median_s']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-gb", default="0.5,1,2", help="comma-separated model sizes in GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        rows = measure(sizes, args.repeats, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "repeats": args.repeats, "load_avg_1m": os.getloadavg()[0]}
    (OUT / "deploy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = table(rows)
    (OUT / "deploy.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
