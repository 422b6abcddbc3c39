"""The ``onnx_genai`` MLflow flavor: log, load and serve ONNX Runtime GenAI model folders.

It has the shape of MLflow's own flavors (``mlflow.onnx``): ``save_model``, ``log_model``, ``load_model``
and ``_load_pyfunc``, with a private wrapper class doing pyfunc ``predict``.

Example:
    >>> import mlflow, mlflow_slmops.flavor as onnx_genai               # doctest: +SKIP
    >>> with mlflow.start_run():                                          # doctest: +SKIP
    ...     info = onnx_genai.log_model("out/int4", name="model")
    >>> chat = mlflow.pyfunc.load_model(info.model_uri)                   # doctest: +SKIP
    >>> chat.predict({"messages": [{"role": "user", "content": "Hi"}]}, params={"max_new_tokens": 16})
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types.schema import ParamSchema, ParamSpec
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import (
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
)

from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir
from mlflow_slmops.genai.runtime import (  # noqa: F401
    DEFAULT_INFERENCE_CONFIG,
    GenaiModel,
    Generation,
    resolve_params,
)

FLAVOR_NAME = "onnx_genai"
_MODEL_SUBDIR = "model"

_PARAM_TYPES = {"max_new_tokens": "long", "temperature": "double", "top_p": "double", "top_k": "long", "do_sample": "boolean"}


def get_default_pip_requirements() -> list[str]:
    """What a model served from a fresh environment needs: this package brings the rest, pinned."""
    from importlib.metadata import version

    return [f"mlflow-slmops=={version('mlflow-slmops')}", f"onnxruntime-genai=={version('onnxruntime-genai')}"]


def default_signature(inference_config: dict | None = None) -> ModelSignature:
    """Free-form input (chat dicts, message lists, prompt strings) with the generation params declared."""
    defaults = {**DEFAULT_INFERENCE_CONFIG, **(inference_config or {})}
    params = ParamSchema([ParamSpec(k, _PARAM_TYPES[k], defaults[k]) for k in _PARAM_TYPES])
    return ModelSignature(inputs=None, outputs=None, params=params)


def _validate_inference_config(config: dict | None) -> dict:
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULT_INFERENCE_CONFIG))
    if unknown:
        raise SlmopsError(
            f"inference_config has unknown keys {unknown}",
            f"use only {', '.join(DEFAULT_INFERENCE_CONFIG)}",
        )
    return config


def _flavor_conf(info: modeldir.GenaiDirInfo, weights_sha256: str, inference_config: dict, variant: dict | None) -> dict:
    import onnxruntime_genai

    conf = {
        "model_dir": _MODEL_SUBDIR,
        "model_type": info.model_type,
        "context_length": info.context_length,
        "execution_provider": info.execution_provider,
        "size_bytes": info.size_bytes,
        "weights_sha256": weights_sha256,
        "onnxruntime_genai_version": onnxruntime_genai.__version__,
        "inference_config": inference_config,
    }
    for key in ("precision", "variant"):
        if variant and variant.get(key) is not None:
            conf[key] = variant[key]
    return conf


def save_model(
    genai_model_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    inference_config: dict | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    metadata: dict | None = None,
    variant: dict | None = None,
    mlflow_model: Model | None = None,
    **kwargs,
) -> None:
    """Save an ONNX Runtime GenAI model folder as an MLflow model at ``path``.

    The folder is checked first (config, ONNX graph, complete external data, tokenizer); nothing is
    written to ``path`` unless the whole save succeeds.

    Args:
        genai_model_dir: a folder holding ``genai_config.json``, the ONNX model and the tokenizer.
        path: the MLflow model folder to create; it must not exist or must be empty.
        inference_config: default generation params (``max_new_tokens``, ``temperature``, ``top_p``,
            ``top_k``, ``do_sample``) that pyfunc ``predict`` uses when a call does not pass them.
        signature: defaults to free-form input with the generation params declared.
        input_example: saved beside the model, as MLflow flavors do.
        pip_requirements, extra_pip_requirements, conda_env: as for every MLflow flavor.
        metadata: free-form metadata written into MLmodel.
        variant: ``{"variant": name, "precision": ...}`` recorded in the flavor config when known.

    Example:
        >>> save_model("out/int4", "saved/int4-model")   # doctest: +SKIP
    """
    src = Path(genai_model_dir)
    path = Path(os.path.abspath(path))
    info = modeldir.check_genai_dir(src)
    weights_sha256 = modeldir.weights_hash(src)
    inference_config = _validate_inference_config(inference_config)
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SlmopsError(f"save path {path} already exists and is not empty", "choose a new path or remove it")

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_model(src, staging, info, weights_sha256, inference_config, signature, input_example,
                     pip_requirements, extra_pip_requirements, conda_env, code_paths, metadata, variant,
                     mlflow_model)
        if path.exists():
            path.rmdir()
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_model(src, dst, info, weights_sha256, inference_config, signature, input_example,
                 pip_requirements, extra_pip_requirements, conda_env, code_paths, metadata, variant,
                 mlflow_model) -> None:
    mlflow_model = mlflow_model or Model()
    code_dir_subpath = _validate_and_copy_code_paths(code_paths, str(dst))
    mlflow_model.signature = signature or default_signature(inference_config)
    if input_example is not None:
        _save_example(mlflow_model, input_example, str(dst))
    if metadata is not None:
        mlflow_model.metadata = metadata
    try:
        shutil.copytree(src, dst / _MODEL_SUBDIR, symlinks=False)
    except OSError as exc:
        raise SlmopsError(f"cannot copy {src} into the MLflow model: {exc}", "check free disk space and permissions")
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_slmops.flavor",
        data=_MODEL_SUBDIR,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        code=code_dir_subpath,
        streamable=True,
    )
    mlflow_model.add_flavor(FLAVOR_NAME, **_flavor_conf(info, weights_sha256, inference_config, variant))
    mlflow_model.model_size_bytes = info.size_bytes
    mlflow_model.save(str(dst / MLMODEL_FILE_NAME))
    _write_environment(dst, pip_requirements, extra_pip_requirements, conda_env)


def _write_environment(dst: Path, pip_requirements, extra_pip_requirements, conda_env) -> None:
    if conda_env is None:
        default_reqs = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_reqs, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_reqs, pip_constraints = _process_conda_env(conda_env)
    with open(dst / _CONDA_ENV_FILE_NAME, "w") as fh:
        yaml.safe_dump(conda_env, stream=fh, default_flow_style=False)
    if pip_constraints:
        write_to(str(dst / _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(str(dst / _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(str(dst / _PYTHON_ENV_FILE_NAME))


def log_model(
    genai_model_dir: str | os.PathLike,
    name: str = "model",
    *,
    inference_config: dict | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    registered_model_name: str | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    metadata: dict | None = None,
    variant: dict | None = None,
    params: dict | None = None,
    tags: dict | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    **kwargs,
):
    """Log an ONNX Runtime GenAI model folder as an MLflow model in the active run.

    Args:
        genai_model_dir: the folder to log (checked as in ``save_model``).
        name: the logged model's name (MLflow 3's replacement for ``artifact_path``).
        registered_model_name: also register the model under this name.
        Other arguments are those of ``save_model`` and ``mlflow.models.Model.log``.

    Returns:
        ``mlflow.models.model.ModelInfo`` of the logged model.

    Example:
        >>> with mlflow.start_run():                         # doctest: +SKIP
        ...     info = log_model("out/int4", name="model")
    """
    import mlflow_slmops.flavor as this

    return Model.log(
        artifact_path=None,
        name=name,
        flavor=this,
        genai_model_dir=genai_model_dir,
        inference_config=inference_config,
        signature=signature,
        input_example=input_example,
        registered_model_name=registered_model_name,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        metadata=metadata,
        variant=variant,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        **kwargs,
    )


def local_model_dir(local_path: str | os.PathLike) -> Path:
    """The genai folder inside a downloaded MLflow model of this flavor; refuses other flavors."""
    local_path = Path(local_path)
    mlmodel = local_path / MLMODEL_FILE_NAME
    if not mlmodel.is_file():
        raise SlmopsError(f"{local_path} has no MLmodel file, so it is not an MLflow model", "pass an MLflow model URI")
    flavors = Model.load(str(mlmodel)).flavors
    if FLAVOR_NAME not in flavors:
        raise SlmopsError(
            f"model at {local_path} has flavors {sorted(flavors)}, not {FLAVOR_NAME}",
            "log the model with mlflow_slmops.flavor.log_model",
        )
    conf = flavors[FLAVOR_NAME]
    genai_dir = local_path / conf.get("model_dir", _MODEL_SUBDIR)
    modeldir.ensure_inside(local_path, genai_dir, what="model_dir")
    return genai_dir


def load_model(model_uri: str, dst_path: str | None = None) -> "GenaiModel":
    """Load an ``onnx_genai`` model as a ``GenaiModel`` (``onnxruntime_genai.Model`` + ``Tokenizer``).

    Args:
        model_uri: ``runs:/<id>/model``, ``models:/NAME@alias``, ``models:/NAME/3`` or a local path.
        dst_path: where to download the artifacts; a temporary folder if None.

    Example:
        >>> m = load_model("models:/qwen-support@champion")   # doctest: +SKIP
        >>> m.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8)["choices"][0]["message"]["content"]
    """
    local = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    conf = _get_flavor_configuration(model_path=local, flavor_name=FLAVOR_NAME)
    return GenaiModel(local_model_dir(local), conf.get("inference_config"))


def _load_pyfunc(path: str) -> "_GenaiPyfuncWrapper":
    """Called by ``mlflow.pyfunc.load_model`` with the ``data`` folder (the genai folder).

    MLmodel comes with the artifacts, so its entries are untrusted: the model is always loaded from the
    flavor's ``model_dir`` inside the MLflow model folder, and a ``data`` entry that leads outside it
    (absolute, ``..`` or a symlink) is refused.
    """
    path = Path(path)
    mlmodel_dir = path if (path / MLMODEL_FILE_NAME).is_file() else path.parent
    if not (mlmodel_dir / MLMODEL_FILE_NAME).is_file():
        raise SlmopsError(f"pyfunc data path {path} is not inside an MLflow model folder",
                          "set the pyfunc data entry of MLmodel to the model's own folder (model)")
    modeldir.ensure_inside(mlmodel_dir, path, what="pyfunc data")
    conf = Model.load(str(mlmodel_dir / MLMODEL_FILE_NAME)).flavors.get(FLAVOR_NAME, {})
    return _GenaiPyfuncWrapper(GenaiModel(local_model_dir(mlmodel_dir), conf.get("inference_config")))


class _GenaiPyfuncWrapper:
    """pyfunc predict over a GenaiModel. Accepts chat dicts, lists of message lists, prompts."""

    def __init__(self, genai_model: GenaiModel):
        self.genai_model = genai_model

    def get_raw_model(self) -> GenaiModel:
        return self.genai_model

    def predict_stream(self, data: Any, params: dict | None = None):
        """Stream one chat as OpenAI ``chat.completion.chunk`` dicts (``mlflow.pyfunc`` ``predict_stream``)."""
        messages, tools = _stream_input(data)
        return self.genai_model.chat_stream(messages, tools=tools, **(params or {}))

    def predict(self, data: Any, params: dict | None = None) -> Any:
        import pandas as pd

        m = self.genai_model
        if isinstance(data, dict) and "messages" in data:
            return m.chat(data["messages"], tools=data.get("tools"), **(params or {}))
        if isinstance(data, pd.DataFrame):
            if "messages" in data.columns:
                tools = data["tools"] if "tools" in data.columns else [None] * len(data)
                return [m.chat(_as_list(msgs), tools=_as_list(t) if t is not None else None, **(params or {}))
                        for msgs, t in zip(data["messages"], tools)]
            if "prompt" in data.columns:
                return [m.generate(str(p), **(params or {})).text for p in data["prompt"]]
            if data.shape[1] == 1 and data.dtypes.iloc[0] == object:
                return [m.generate(str(p), **(params or {})).text for p in data.iloc[:, 0]]
            raise SlmopsError(
                f"DataFrame input has columns {list(data.columns)}, expected 'messages' or 'prompt'",
                "send chat messages or a 'prompt' column",
            )
        if isinstance(data, str):
            return [m.generate(data, **(params or {})).text]
        if isinstance(data, list) and data:
            if all(isinstance(x, str) for x in data):
                return [m.generate(x, **(params or {})).text for x in data]
            if all(isinstance(x, list) for x in data):
                return [m.chat(x, **(params or {})) for x in data]
            if all(isinstance(x, dict) and "role" in x for x in data):
                return m.chat(data, **(params or {}))
        raise SlmopsError(
            f"cannot read input of type {type(data).__name__}",
            'send {"messages": [...]}, a list of message lists, a list of prompts or a DataFrame with a prompt column',
        )


def _stream_input(data: Any) -> tuple[list[dict], list[dict] | None]:
    import pandas as pd

    if isinstance(data, pd.DataFrame) and "messages" in data.columns and len(data) == 1:
        row = data.iloc[0]
        tools = row["tools"] if "tools" in data.columns else None
        return _as_list(row["messages"]), (_as_list(tools) if tools is not None else None)
    if isinstance(data, dict) and "messages" in data:
        return data["messages"], data.get("tools")
    if isinstance(data, list) and data and all(isinstance(x, dict) and "role" in x for x in data):
        return data, None
    raise SlmopsError(f"predict_stream takes one chat, got {type(data).__name__}",
                      'send {"messages": [...]} (and "tools": [...]) for one conversation')


def _as_list(value: Any) -> list:
    """A DataFrame cell of messages can arrive as a list, a numpy array or a JSON string."""
    if isinstance(value, str):
        return json.loads(value)
    return [dict(x) for x in list(value)]
