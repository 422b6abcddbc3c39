#!/usr/bin/env python
"""Fan a sweep out: one `mlflow run -e sweep` job per variant, all submitted at once, all logging to
one tracking server.

Each job is a sweep run of its own holding its variant, plus the fp32 baseline that quality is
measured against (jobs that share a conversion cache build fp32 once). Every job run carries the
tag ``slmops.fanout=<ID>``, so the runs table filters one fan-out with ``tags.slmops.fanout = '<ID>'``.

The same call runs the jobs as local processes (the default) or as Kubernetes Jobs, see
docs/scaling.md:

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python projects/fanout.py --model ./my-model --variants int8,int4
    python projects/fanout.py --model /models/my-model --variants int8,int4 \\
        --project projects/kubernetes --backend kubernetes --backend-config projects/kubernetes/kubernetes_config.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = "sweep"
FANOUT_TAG = "slmops.fanout"
VARIANT_TAG = "slmops.variant"  # mirrors mlflow_slmops.metrics.VARIANT_TAG; this script imports no package code
SHOWN_METRICS = ("size_mb", "decode_tok_s", "ttft_ms", "ppl_delta_pct")


@dataclass
class Job:
    """One submitted `mlflow run`: the variant it measures and MLflow's handle on it."""

    variant: str
    submitted: object  # mlflow.projects.SubmittedRun

    @property
    def run_id(self) -> str:
        return self.submitted.run_id


@dataclass
class JobOutcome:
    variant: str
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)


def submit_jobs(model: str, variants: list[str], output: str, experiment: str, *, project: str = str(REPO_ROOT),
                backend: str = "local", backend_config: str | None = None, prompt_len: int = 128,
                repeats: int = 5, fanout_id: str | None = None) -> tuple[str, list[Job]]:
    """Submit one sweep job per variant without waiting for any; returns the fan-out ID and the jobs.

    Args:
        model: the Hugging Face model folder (as the jobs see it: a path inside the pod on Kubernetes).
        variants: one job per name (presets such as int8, int4).
        output: each job writes its genai folders and report under ``<output>/<variant>``.
        experiment: the MLflow experiment every job logs to.
        project: the MLproject folder; Kubernetes needs one with a ``docker_env``.
        backend: ``local`` (processes on this machine) or ``kubernetes``.
        backend_config: the Kubernetes backend's JSON config file.
        prompt_len: benchmark prompt length.
        repeats: timed generations per measurement.
        fanout_id: tag value shared by the jobs (default: a timestamp).

    Example:
        >>> fid, jobs = submit_jobs("./my-model", ["int8", "int4"], "out", "slmops")  # doctest: +SKIP
        >>> outcomes = wait_for(jobs, "slmops")  # doctest: +SKIP
    """
    import mlflow

    fanout_id = fanout_id or time.strftime("fanout-%Y%m%d-%H%M%S")
    if backend == "local":
        _put_interpreter_on_path()
    client = mlflow.MlflowClient()
    jobs = []
    for variant in variants:
        submitted = mlflow.projects.run(
            uri=project, entry_point=ENTRY_POINT, experiment_name=experiment, run_name=f"sweep-{variant}",
            parameters={"model": model, "variants": variant, "output": f"{output}/{variant}",
                        "prompt_len": prompt_len, "repeats": repeats},
            backend=backend, backend_config=backend_config,
            # Local jobs run in this environment; Kubernetes jobs run in the project's image.
            env_manager="local" if backend == "local" else None,
            synchronous=False,
        )
        client.set_tag(submitted.run_id, FANOUT_TAG, fanout_id)
        jobs.append(Job(variant, submitted))
    return fanout_id, jobs


def _put_interpreter_on_path() -> None:
    """Asynchronous local runs start an `mlflow run` subprocess found on PATH: use this environment's."""
    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("mlflow") != str(Path(bin_dir) / "mlflow"):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def wait_for(jobs: list[Job], experiment: str) -> list[JobOutcome]:
    """Wait for every job (cancelling the rest on Ctrl-C) and read its variant's metrics from the server."""
    import mlflow

    try:
        finished = {job.variant: job.submitted.wait() for job in jobs}
    except KeyboardInterrupt:
        for job in jobs:
            job.submitted.cancel()
        raise
    client = mlflow.MlflowClient()
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    outcomes = []
    for job in jobs:
        children = client.search_runs(
            [exp_id], f"tags.mlflow.parentRunId = '{job.run_id}' and tags.`{VARIANT_TAG}` = '{job.variant}'")
        metrics = dict(children[0].data.metrics) if children else {}
        outcomes.append(JobOutcome(job.variant, job.run_id, "ok" if finished[job.variant] else "failed", metrics))
    return outcomes


def format_table(outcomes: list[JobOutcome]) -> str:
    header = ["variant", "job run", "status", *SHOWN_METRICS]
    rows = [[o.variant, o.run_id, o.status, *(_fmt(o.metrics.get(m)) for m in SHOWN_METRICS)] for o in outcomes]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder, as the jobs see it.")
    parser.add_argument("--variants", required=True, help="Comma-separated variants: one job each.")
    parser.add_argument("--output", default=".slmops/fanout", help="Jobs write under OUTPUT/<variant>.")
    parser.add_argument("--experiment", default="slmops", help="MLflow experiment of every job.")
    parser.add_argument("--project", default=str(REPO_ROOT), help="MLproject folder (Kubernetes: projects/kubernetes).")
    parser.add_argument("--backend", default="local", choices=["local", "kubernetes"])
    parser.add_argument("--backend-config", default=None, help="Kubernetes backend config JSON.")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import mlflow

    args = _parse_args(argv)
    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        # Concurrent jobs on one sqlite file wait on its lock; a server serialises them properly.
        print(f"Warning: MLFLOW_TRACKING_URI is {mlflow.get_tracking_uri()}; concurrent jobs want a tracking "
              "server (see docs/scaling.md).", file=sys.stderr)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    # Local jobs run in the project folder, so local paths are made absolute; pod paths are left alone.
    local = args.backend == "local"
    model = str(Path(args.model).resolve()) if local else args.model
    output = str(Path(args.output).resolve()) if local else args.output
    fanout_id, jobs = submit_jobs(
        model, variants, output,
        args.experiment, project=args.project, backend=args.backend, backend_config=args.backend_config,
        prompt_len=args.prompt_len, repeats=args.repeats)
    print(f"Submitted {len(jobs)} jobs ({FANOUT_TAG}={fanout_id}): "
          + ", ".join(f"{j.variant}={j.run_id}" for j in jobs), flush=True)
    outcomes = wait_for(jobs, args.experiment)
    print(format_table(outcomes))
    failed = [o.variant for o in outcomes if o.status != "ok"]
    if failed:
        print(f"Failed jobs: {', '.join(failed)} (see their runs' logs and the slmops.error tags)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
