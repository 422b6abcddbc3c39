"""Tracking defaults shared by every command: the embedded sqlite store, the experiment, a reachability check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from mlflow_slmops import metrics
from mlflow_slmops.errors import SlmopsError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "slmops"
# Without this tag MLflow 3.17 opens an experiment on the GenAI traces page instead of the runs table.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
# How long the reachability check waits for a remote tracking server.
REACHABILITY_TIMEOUT_S = 5


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI or the embedded sqlite store and check it answers."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    check_reachable(uri)
    return uri


def configure(experiment: str | None = None) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI or the embedded sqlite store, check it answers, set the experiment.

    Returns the experiment ID. A remote server that does not answer is reported before any work starts.
    """
    import mlflow

    connect()
    client = mlflow.MlflowClient()
    # Under `mlflow run`, the run and experiment are chosen already: use them, only add the tag.
    env_run = os.environ.get("MLFLOW_RUN_ID")
    env_exp = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_run or env_exp:
        exp_id = client.get_run(env_run).info.experiment_id if env_run else env_exp
        _tag_experiment(client, exp_id)
        mlflow.set_experiment(experiment_id=exp_id)
        return exp_id
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = mlflow.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(name, tags=dict([EXPERIMENT_KIND_TAG]))
    _tag_experiment(client, exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _tag_experiment(client, exp_id: str) -> None:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment(exp_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG[0]) is None:
        try:
            client.set_experiment_tag(exp_id, *EXPERIMENT_KIND_TAG)
        except MlflowException:
            # Two sweeps starting at once into one new experiment: the other one's tag won the insert.
            if client.get_experiment(exp_id).tags.get(EXPERIMENT_KIND_TAG[0]) is None:
                raise


def check_reachable(uri: str) -> None:
    """For an http(s) tracking URI, fail fast with one line if the server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=REACHABILITY_TIMEOUT_S)
    except requests.RequestException as exc:
        raise SlmopsError(
            f"the MLflow tracking server at {uri} cannot be reached ({type(exc).__name__})",
            "start the server or unset MLFLOW_TRACKING_URI to use the local sqlite store",
        )


def log_standalone_run(kind: str, role: str, model_dir: str, log: Callable[[], None]) -> str:
    """One top-level run for a stage used on its own (`slmops benchmark`, `slmops evaluate`); return its ID.

    The run is named ``<kind>-<model folder name>``, tagged with its role, records ``model_dir`` as a param,
    and ``log()`` logs the rest inside it.
    """
    import mlflow

    with mlflow.start_run(run_name=f"{kind}-{Path(model_dir).name}", tags={metrics.ROLE_TAG: role}) as run:
        mlflow.log_param("model_dir", model_dir)
        log()
    return run.info.run_id
