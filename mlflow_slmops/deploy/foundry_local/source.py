"""Resolve the model URI of a deployment to a local onnx_genai folder, without copying when it can.

``models:/NAME@alias``, ``models:/NAME/3``, ``models:/m-<id>``, ``runs:/<run>/<name>`` and local paths are
resolved through the registry and the logged model to their artifact location. When that location is a local
folder (the usual file artifact store), the deployment reads it in place, so the weights can be hardlinked
from it. Otherwise the artifacts are downloaded to a temporary folder first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from mlflow_slmops.errors import SlmopsError


@dataclass(frozen=True)
class ModelSource:
    """An onnx_genai model ready to deploy, and where it came from."""

    uri: str
    mlflow_model_dir: Path
    genai_dir: Path
    flavor_conf: dict
    registered_model_name: str | None = None
    registered_model_version: str | None = None
    run_id: str | None = None
    logged_model_id: str | None = None


@dataclass(frozen=True)
class _Location:
    artifact_uri: str
    registered_model_name: str | None = None
    registered_model_version: str | None = None
    run_id: str | None = None
    logged_model_id: str | None = None


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme and os.path.isabs(uri):
        return Path(uri)
    return None


def _lookup_error(uri: str, exc: Exception) -> SlmopsError:
    from mlflow.exceptions import MlflowException

    detail = " ".join(str(exc.message if isinstance(exc, MlflowException) else exc).split())
    return SlmopsError(
        f"model URI {uri} does not resolve to a model ({detail})",
        "check the registered model name, version or alias, or the run ID, against the tracking server",
    )


def _registry_location(uri: str) -> _Location:
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    ident = get_model_name_and_version(client, uri)
    if len(ident) == 1:  # models:/m-<id>: a logged model, not a registry version
        logged = client.get_logged_model(ident[0])
        return _Location(logged.artifact_location, run_id=logged.source_run_id, logged_model_id=logged.model_id)
    name, version = ident
    mv = client.get_model_version(name, str(version))
    logged_id = mv.source.split("/", 1)[1] if str(mv.source).startswith("models:/m-") else None
    return _Location(client.get_model_version_download_uri(name, str(version)), name, str(mv.version),
                     mv.run_id, logged_id)


def _run_location(uri: str) -> _Location:
    from mlflow import MlflowClient
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    run_id, rel = RunsArtifactRepository.parse_runs_uri(uri)
    client = MlflowClient()
    run = client.get_run(run_id)
    model_name, _, rest = (rel or "").partition("/")
    if model_name:
        # MLflow 3 keeps a run's models as logged models, outside the run's own artifact folder.
        for logged in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                  filter_string=f"name = '{model_name}'"):
            if logged.source_run_id == run_id:
                location = logged.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
                return _Location(location, run_id=run_id, logged_model_id=logged.model_id)
    return _Location(RunsArtifactRepository.get_underlying_uri(uri), run_id=run_id)


def _locate(uri: str) -> _Location:
    from mlflow.exceptions import MlflowException

    from mlflow_slmops.track import tracking

    scheme = urlparse(uri).scheme
    if scheme not in ("models", "runs"):
        return _Location(uri)
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        return _registry_location(uri) if scheme == "models" else _run_location(uri)
    except MlflowException as exc:
        raise _lookup_error(uri, exc)


@contextmanager
def resolve(model_uri: str) -> Iterator[ModelSource]:
    """Find the onnx_genai model behind a URI; yields it (a temporary download is removed afterwards).

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/<run_id>/model`` or a local path.

    Example:
        >>> with resolve("models:/qwen-support@champion") as src:   # doctest: +SKIP
        ...     print(src.genai_dir, src.registered_model_version)
    """
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME

    from mlflow_slmops import flavor

    if not model_uri or not str(model_uri).strip():
        raise SlmopsError("no model URI was given", "pass -m models:/NAME@alias, models:/NAME/VERSION or runs:/RUN/model")
    location = _locate(model_uri)
    local = _local_path(location.artifact_uri)
    if local is None and not urlparse(model_uri).scheme:
        local = Path(model_uri).expanduser().resolve()
    scratch = None
    try:
        if local is None or not local.exists():
            if not urlparse(model_uri).scheme:
                raise SlmopsError(f"model path {model_uri} does not exist", "pass an MLflow model folder or a models:/ URI")
            scratch = Path(tempfile.mkdtemp(prefix="slmops-deploy-"))
            local = _download(model_uri, scratch)
        genai_dir = flavor.local_model_dir(local)
        conf = Model.load(str(local / MLMODEL_FILE_NAME)).flavors.get(flavor.FLAVOR_NAME, {})
        yield ModelSource(model_uri, local, genai_dir, conf, location.registered_model_name,
                          location.registered_model_version, location.run_id, location.logged_model_id)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _download(model_uri: str, dst: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise _lookup_error(model_uri, exc)
    except OSError as exc:
        raise SlmopsError(f"cannot download {model_uri}: {exc.strerror or exc}", "check the URI and free disk space")
