"""The ``foundry-local`` MLflow deployment target: onnx_genai models into Foundry Local's model cache.

``mlflow deployments create -t foundry-local --name qwen-support -m models:/qwen-support@champion`` writes the
model into the Foundry Local cache (see ``cache.py`` for the layout and its safety), registers it in Foundry
Local's local catalog, and ``predict``/``run-local`` answer chats through the real Foundry Local runtime.

This module holds exactly one ``BaseDeploymentClient`` subclass (MLflow's plugin loader insists), plus the
module-level ``run_local`` and ``target_help``. Errors are ``FoundryLocalDeploymentError``: an ``SlmopsError``
(hence an ``MlflowException``) that is also a ``click.ClickException``, so the ``mlflow deployments`` CLI prints
it as one ``Error: ...`` line with exit code 1 instead of a traceback.

Example:
    >>> from mlflow.deployments import get_deploy_client                       # doctest: +SKIP
    >>> client = get_deploy_client("foundry-local:/tmp/foundry-cache")
    >>> client.create_deployment("qwen-support", "models:/qwen-support@champion", config={"temperature": "0.2"})
    {'name': 'qwen-support', 'flavor': 'onnx_genai', 'model_id': 'qwen-support:3', ...}
    >>> client.predict("qwen-support", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16})
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import click
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException

from mlflow_slmops.genai import chat
from mlflow_slmops.deploy.foundry_local import cache as fcache
from mlflow_slmops.deploy.foundry_local import capabilities
from mlflow_slmops.deploy.foundry_local import config as fconfig
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir

FLAVOR = "onnx_genai"
TARGET = "foundry-local"
CHAT_OPTION_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "do_sample")
_MB = 1 << 20


class FoundryLocalDeploymentError(SlmopsError, click.ClickException):
    """A user error of the foundry-local target: one line at the CLI, an MlflowException in Python."""

    exit_code = 1

    def format_message(self) -> str:
        return self.message


def _os_error(exc: OSError) -> FoundryLocalDeploymentError:
    where = exc.filename2 or exc.filename or "the Foundry cache"  # a copy: the destination is what failed
    if exc.errno == errno.ENOSPC:
        hint = "free disk space or deploy to a cache on another disk with -t foundry-local:/path"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a writable cache folder with -t foundry-local:/path"
    else:
        hint = "check the cache path, permissions and free disk space"
    return FoundryLocalDeploymentError(f"cannot write {where}: {exc.strerror or exc}; nothing was deployed", hint)


def _friendly(fn):
    """Turn every user-fixable failure into a FoundryLocalDeploymentError (one line at the CLI)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FoundryLocalDeploymentError:
            raise
        except SlmopsError as exc:
            raise FoundryLocalDeploymentError(exc.detail, exc.hint) from None
        except MlflowException as exc:
            raise FoundryLocalDeploymentError(" ".join(str(exc.message).split())) from None
        except OSError as exc:
            raise _os_error(exc) from None

    return wrapper


def _check_flavor(flavor: str | None) -> None:
    if flavor not in (None, FLAVOR):
        raise SlmopsError(f"flavor {flavor!r} cannot be deployed to {TARGET}", f"pass -f {FLAVOR} or leave -f out")


@dataclass(frozen=True)
class _Plan:
    """Everything decided (and checked) before anything is written."""

    name: str
    publisher: str
    model_id: str
    final: Path
    contents: fcache.FolderContents
    previous: fcache.Entry | None


class FoundryLocalDeploymentClient(BaseDeploymentClient):
    """Deployments of onnx_genai models into one Foundry Local model cache.

    Target URIs: ``foundry-local`` (the `foundry` CLI's cache location, else ~/.foundry/cache/models) or
    ``foundry-local:/absolute/path``. See ``target_help()`` for the ``-C`` settings.
    """

    @_friendly
    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        self.cache = fcache.FoundryCache(fcache.cache_dir_from_target(target_uri))

    # --- write operations -------------------------------------------------------------------------

    @_friendly
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None) -> dict:
        """Deploy an onnx_genai model under a new name; fails if the name is already deployed."""
        _check_flavor(flavor)
        return self._deploy(name, model_uri, fconfig.parse_config(config), mode="create")

    @_friendly
    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None) -> dict:
        """Swap in another model (or only new settings) atomically; earlier settings are kept unless overridden."""
        _check_flavor(flavor)
        return self._deploy(name, model_uri, fconfig.parse_config(config), mode="update")

    @_friendly
    def delete_deployment(self, name, config=None, endpoint=None) -> None:
        """Remove our folders of this name and unregister them. Idempotent; never touches folders not ours."""
        fcache.validate_name(name)
        entries = self.cache.entries(name)
        if not entries:
            return None
        from mlflow_slmops.deploy.foundry_local import runtime

        with self.cache.lock(entries[0].provenance.publisher, name):
            rt = runtime.runtime_for(self.cache.root)
            for entry in self.cache.entries(name):
                _unregister_if_ours(rt, entry)
                fcache.discard(entry.path)
            self.cache.clear_leftovers(name)
        return None

    def _deploy(self, name: str, model_uri: str | None, settings: fconfig.DeploymentConfig, mode: str) -> dict:
        from mlflow_slmops.deploy.foundry_local import source

        fcache.validate_name(name)
        previous = self.cache.find(name)
        _check_mode(name, mode, previous, self.cache.root)
        if previous is not None:
            settings = settings.merged_over(previous.provenance.config)
        if model_uri is None:
            if previous is None:
                raise SlmopsError("no model URI was given", "pass -m models:/NAME@alias or another model URI")
            return self._write(_plan(self.cache, name, _source_of(previous), settings, previous, model_uri))
        with source.resolve(model_uri) as src:
            return self._write(_plan(self.cache, name, src, settings, previous, model_uri))

    def _write(self, plan: _Plan) -> dict:
        from mlflow_slmops.deploy.foundry_local import runtime

        with self.cache.lock(plan.publisher, plan.name):
            rt = runtime.runtime_for(self.cache.root)
            _recover(self.cache, rt, plan.name)
            current = self.cache.find(plan.name)
            if (current and current.provenance.deployed_at) != (plan.previous and plan.previous.provenance.deployed_at):
                raise SlmopsError(f"deployment {plan.name} changed while this deploy was being prepared", "retry")
            _check_conflicts(self.cache, rt, plan)
            staging = self.cache.stage(plan.publisher, plan.model_id)
            try:
                fcache.build(staging, plan.contents)
                fcache.commit(staging, plan.final)
            except BaseException:
                fcache.discard(staging)
                raise
            _register_and_retire(self.cache, rt, plan)
        return self._describe(self.cache.find(plan.name), registered=True)

    # --- read operations --------------------------------------------------------------------------

    @_friendly
    def list_deployments(self, endpoint=None) -> list[dict]:
        """Every deployment of ours in this cache: name, model ID, source, version, path."""
        return [_summary(e) for e in self.cache.entries()]

    @_friendly
    def get_deployment(self, name, endpoint=None) -> dict:
        """Name, model ID, source URI and registry version, run ID, size, path, settings, catalog state."""
        fcache.validate_name(name)
        entry = self._entry(name)
        from mlflow_slmops.deploy.foundry_local import runtime

        rt = runtime.runtime_for(self.cache.root)
        return self._describe(entry, registered=_same_path(rt.registered_path(entry.model_id), entry.path))

    def _entry(self, name: str) -> fcache.Entry:
        entry = self.cache.find(name)
        if entry is None:
            raise SlmopsError(f"deployment {name} was not found in the Foundry cache {self.cache.root}",
                              f"list deployments with `mlflow deployments list -t {self.target_uri}`")
        return entry

    def _describe(self, entry: fcache.Entry, registered: bool) -> dict:
        prov = entry.provenance
        return {**_summary(entry), "run_id": prov.run_id, "logged_model_id": prov.logged_model_id,
                "weights_sha256": prov.weights_sha256, "size_bytes": modeldir.dir_size_bytes(entry.path),
                "deployed_at": prov.deployed_at, "link_mode": prov.link_mode, "config": prov.config,
                "registered_in_foundry_catalog": registered, "cache": str(self.cache.root),
                **capabilities.describe(entry.path)}

    # --- inference --------------------------------------------------------------------------------

    @_friendly
    def predict(self, deployment_name=None, inputs=None, endpoint=None) -> PredictionsResponse:
        """Chat through the Foundry Local runtime in this process; returns OpenAI-style chat completions.

        Args:
            deployment_name: the deployment's name.
            inputs: ``{"messages": [...], "max_tokens": 16, ...}`` (options: max_tokens, temperature, top_p,
                top_k, seed, do_sample; unset ones keep the deployed genai_config.json search defaults; ``tools``,
                OpenAI function tools, for a model deployed with tool calling), a list of messages, a list of
                conversations, or the DataFrame that ``mlflow deployments predict --input-path`` reads from such
                JSON.

        Returns:
            For one conversation, the ``chat.completion`` itself (``response["choices"][0]["message"]``);
            for several, ``{"predictions": [chat.completion, ...]}``.
        """
        entry = self._entry(fcache.validate_name(deployment_name or ""))
        conversations, options, tools = _chat_inputs(inputs)
        rt = self._runtime_with(entry)
        results = [_completion(entry.model_id, rt.chat(entry.model_id, conv, options, tools)) for conv in conversations]
        return PredictionsResponse(results[0] if len(results) == 1 else {"predictions": results})

    @_friendly
    def predict_stream(self, deployment_name=None, inputs=None, endpoint=None) -> Iterator[dict]:
        """Stream one chat as OpenAI-style ``chat.completion.chunk`` dicts (the last one has the usage)."""
        entry = self._entry(fcache.validate_name(deployment_name or ""))
        conversations, options, tools = _chat_inputs(inputs)
        if len(conversations) != 1:
            raise SlmopsError(f"streaming takes one conversation, got {len(conversations)}", "send one message list")
        rt = self._runtime_with(entry)
        return _friendly_iter(_chunks(entry.model_id, rt.chat_stream(entry.model_id, conversations[0], options, tools)))

    def _runtime_with(self, entry: fcache.Entry):
        from mlflow_slmops.deploy.foundry_local import runtime

        rt = runtime.runtime_for(self.cache.root)
        if not _same_path(rt.registered_path(entry.model_id), entry.path):
            rt.register(entry.model_id, entry.path)  # the catalog file was reset: our folder is still the truth
        return rt


# --- deployment planning ---------------------------------------------------------------------------


def _check_mode(name: str, mode: str, previous: fcache.Entry | None, root: Path) -> None:
    if mode == "create" and previous is not None:
        raise SlmopsError(f"deployment {name} already exists in {root} (model {previous.model_id})",
                          "use `mlflow deployments update` to replace it, or pick another --name")
    if mode == "update" and previous is None:
        raise SlmopsError(f"deployment {name} does not exist in {root}", "create it first with `mlflow deployments create`")


def _source_of(entry: fcache.Entry):
    """An update without -m redeploys the deployed folder itself with new settings."""
    from mlflow_slmops.deploy.foundry_local.source import ModelSource

    p = entry.provenance
    return ModelSource(p.source_uri, entry.path, entry.path, {"weights_sha256": p.weights_sha256},
                       p.registered_model_name, p.registered_model_version, p.run_id, p.logged_model_id)


def _version(settings: fconfig.DeploymentConfig, src, previous: fcache.Entry | None, model_uri: str | None) -> int:
    """Explicit -C version, else the registry version, else 1 (a new model under an old name: previous + 1)."""
    if settings.version is not None:
        return settings.version
    if src.registered_model_version is not None:
        return int(src.registered_model_version)
    if previous is None:
        return 1
    return previous.provenance.version + (1 if model_uri is not None else 0)


def _genai_config(genai_dir: Path, search: dict, caps) -> dict:
    """The deployed genai_config.json: the model's, our search defaults, the tool/reasoning token ids."""
    cfg = modeldir.read_genai_config(genai_dir)
    context = int(cfg["model"].get("context_length") or 0)
    if context and search.get("max_length", 0) > context:
        raise SlmopsError(f"-C max_length={search['max_length']} exceeds the model's context length {context}",
                          f"pass -C max_length={context} or less")
    cfg.setdefault("search", {}).update(search)
    for key in capabilities.TOOL_TOKEN_KEYS + capabilities.REASONING_TOKEN_KEYS:
        cfg["model"].pop(key, None)  # an update without -m starts from the deployed folder: settings may change
    cfg["model"].update(caps.genai_model_keys())
    return cfg


def _chat_template(genai_dir: Path, caps) -> str | None:
    template = modeldir.read_chat_template(genai_dir)
    if template is None:
        return None
    template = template.removeprefix(capabilities.THINKING_OFF_PREFIX)
    return capabilities.thinking_off_template(template) if caps.thinking_off else template


def _plan(cache: fcache.FoundryCache, name: str, src, settings: fconfig.DeploymentConfig,
          previous: fcache.Entry | None, model_uri: str | None) -> _Plan:
    from mlflow_slmops import __version__
    from mlflow_slmops.deploy.foundry_local import preflight, prompt_template

    info = modeldir.check_genai_dir(src.genai_dir)
    pieces = prompt_template.for_model(src.genai_dir, settings.prompt_template)
    caps = capabilities.detect(src.genai_dir, settings.tool_calling, settings.reasoning)
    genai_config = _genai_config(src.genai_dir, settings.search, caps)
    preflight.run(genai_config, f"model {src.uri}")
    publisher = settings.publisher or fconfig.DEFAULT_PUBLISHER
    model_id = f"{name}:{_version(settings, src, previous, model_uri)}"
    prov = fcache.Provenance(
        deployment_name=name, model_id=model_id, publisher=publisher, source_uri=src.uri,
        registered_model_name=src.registered_model_name, registered_model_version=src.registered_model_version,
        run_id=src.run_id, logged_model_id=src.logged_model_id,
        weights_sha256=src.flavor_conf.get("weights_sha256") or modeldir.weights_hash(src.genai_dir),
        config={**settings.to_record(), "publisher": publisher}, slmops_version=__version__,
    )
    contents = fcache.FolderContents(
        source_dir=src.genai_dir, weight_files=info.onnx_files,
        genai_config=genai_config, chat_template=_chat_template(src.genai_dir, caps), provenance=prov,
        inference_model={"Name": model_id, "PromptTemplate": pieces},
    )
    plan = _Plan(name, publisher, model_id, cache.model_dir(publisher, model_id), contents, previous)
    _check_folder_conflict(plan)  # before anything is written; checked again under the lock
    return plan


def _same_path(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def _check_folder_conflict(plan: _Plan) -> None:
    """Never overwrite a folder that is not one of ours for this name."""
    if plan.final.exists():
        prov = fcache.Provenance.read(plan.final)
        if prov is None or prov.deployment_name != plan.name:
            raise SlmopsError(f"{plan.final} exists and was not deployed by mlflow-slmops as {plan.name}",
                              "pick another --name, or -C publisher=... / -C version=...")


def _check_conflicts(cache: fcache.FoundryCache, rt, plan: _Plan) -> None:
    """Never overwrite a folder or a catalog entry that is not one of ours for this name."""
    _check_folder_conflict(plan)
    registered = rt.registered_path(plan.model_id)
    ours = [e.path for e in cache.entries(plan.name)] + [plan.final]
    if registered is not None and not any(_same_path(registered, p) for p in ours):
        raise SlmopsError(f"model ID {plan.model_id} is already registered in Foundry Local from {registered}",
                          "pick another --name or -C version=...")


def _unregister_if_ours(rt, entry: fcache.Entry) -> None:
    if _same_path(rt.registered_path(entry.model_id), entry.path):
        rt.unregister(entry.model_id)


def _register_and_retire(cache: fcache.FoundryCache, rt, plan: _Plan) -> None:
    """Register the new folder, then unregister and remove every older folder of this name."""
    try:
        rt.register(plan.model_id, plan.final)
    except SlmopsError:
        if plan.previous is None or not _same_path(plan.previous.path, plan.final):
            fcache.discard(plan.final)  # the old deployment, if any, is untouched
        raise
    for entry in cache.entries(plan.name):
        if not _same_path(entry.path, plan.final):
            _unregister_if_ours(rt, entry)
            fcache.discard(entry.path)


def _recover(cache: fcache.FoundryCache, rt, name: str) -> None:
    """Under the lock: clean what a killed deploy of this name left, keep only the newest complete folder."""
    cache.clear_leftovers(name)
    cache.finish_interrupted_commits(name)
    entries = cache.entries(name)
    for stale in entries[1:]:
        _unregister_if_ours(rt, stale)
        fcache.discard(stale.path)
    if entries and not _same_path(rt.registered_path(entries[0].model_id), entries[0].path):
        rt.register(entries[0].model_id, entries[0].path)


def _summary(entry: fcache.Entry) -> dict:
    prov = entry.provenance
    return {"name": prov.deployment_name, "flavor": FLAVOR, "model_id": prov.model_id, "publisher": prov.publisher,
            "source_uri": prov.source_uri, "registered_model_name": prov.registered_model_name,
            "registered_model_version": prov.registered_model_version, "path": str(entry.path)}


# --- chat input and output -------------------------------------------------------------------------


def _chat_options(values: dict) -> "Any":
    from mlflow_slmops.deploy.foundry_local.runtime import ChatOptions

    parsers = {"max_tokens": fconfig._int_at_least(1), "temperature": fconfig._positive_float,
               "top_p": fconfig._top_p, "top_k": fconfig._int_at_least(1), "seed": fconfig._int_at_least(0),
               "do_sample": fconfig._bool}
    unknown = sorted(set(values) - set(parsers))
    if unknown:
        raise SlmopsError(f"chat input has unknown keys {unknown}", f"use messages and {', '.join(CHAT_OPTION_KEYS)}")
    return ChatOptions(**{k: parsers[k](k, str(v)) for k, v in values.items() if v is not None})


def _conversations_from_frame(df) -> tuple[list[list[dict]], dict]:
    """The DataFrame `pd.read_json` makes of chat JSON: one row per message, or one row per conversation.

    A ``tools`` column holds one tool per message row, or the whole tool list in a conversation row.
    """
    options = {c: df[c].iloc[0] for c in df.columns if c not in ("messages", "role", "content", "tools")}
    options = {k: (v.item() if hasattr(v, "item") else v) for k, v in options.items()}
    if "tools" in df.columns:
        cells = [_plain(c) for c in df["tools"] if isinstance(c, (dict, list)) or hasattr(c, "tolist")]
        options["tools"] = cells if all(isinstance(c, dict) for c in cells) else cells[0]
    if "messages" in df.columns:
        cells = list(df["messages"])
        if all(isinstance(c, dict) for c in cells):
            return [chat.check_messages(cells)], options
        return [chat.check_messages([dict(m) for m in list(c)]) for c in cells], options
    if {"role", "content"} <= set(df.columns):
        return [chat.check_messages(df[["role", "content"]].to_dict("records"))], options
    raise SlmopsError(f"input columns {list(df.columns)} hold no chat", chat.MESSAGES_HINT)


def _chat_inputs(inputs: Any) -> tuple[list[list[dict]], Any, list[dict] | None]:
    """Conversations, options and tools from any accepted input form."""
    import pandas as pd

    options: dict = {}
    if isinstance(inputs, pd.DataFrame):
        conversations, options = _conversations_from_frame(inputs)
    elif isinstance(inputs, dict) and "messages" in inputs:
        options = {k: v for k, v in inputs.items() if k != "messages"}
        msgs = inputs["messages"]
        nested = isinstance(msgs, list) and msgs and all(isinstance(m, list) for m in msgs)
        conversations = [chat.check_messages(m) for m in msgs] if nested else [chat.check_messages(msgs)]
    elif isinstance(inputs, list) and inputs and all(isinstance(m, list) for m in inputs):
        conversations = [chat.check_messages(m) for m in inputs]
    elif isinstance(inputs, list):
        conversations = [chat.check_messages(inputs)]
    elif isinstance(inputs, str) and inputs.strip():
        conversations = [[{"role": "user", "content": inputs}]]
    else:
        raise SlmopsError(f"cannot read chat input of type {type(inputs).__name__}",
                          chat.MESSAGES_HINT)
    tools = chat.check_tools(_plain(options.pop("tools", None)))
    return conversations, _chat_options(options), tools


def _plain(value: Any) -> Any:
    """A DataFrame cell as plain JSON values (pandas may hand back numpy arrays for lists)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _completion(model_id: str, result) -> dict:
    return chat.completion(model_id, result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens,
                           tool_calls=list(result.tool_calls))


def _chunks(model_id: str, pieces: Iterator) -> Iterator[dict]:
    """The runtime's stream (text pieces, then one ChatResult) as ``chat.completion.chunk`` dicts, shaped by
    ``chat.chunks`` as the pyfunc's are."""
    from mlflow_slmops.deploy.foundry_local.runtime import ChatResult

    done: list[ChatResult] = []

    def texts() -> Iterator[str]:
        for piece in pieces:
            if isinstance(piece, ChatResult):
                done.append(piece)
            else:
                yield piece

    def final() -> dict:
        r = done[-1]  # every piece was sent as it came: nothing is left for the last chunk's text
        return chat.completion(model_id, "", r.finish_reason, r.prompt_tokens, r.completion_tokens,
                               tool_calls=list(r.tool_calls))

    return chat.chunks(model_id, texts(), final)


def _friendly_iter(items: Iterator[dict]) -> Iterator[dict]:
    try:
        yield from items
    except FoundryLocalDeploymentError:
        raise
    except SlmopsError as exc:
        raise FoundryLocalDeploymentError(exc.detail, exc.hint) from None


# --- module-level plugin functions -------------------------------------------------------------------


def _target_from_cli() -> str:
    """MLflow's run-local drops the target before calling the plugin: read it from the running CLI command."""
    from mlflow.deployments.utils import parse_target_uri

    ctx = click.get_current_context(silent=True)
    target = ctx.params.get("target") if ctx is not None else None
    env = os.environ.get("MLFLOW_DEPLOYMENTS_TARGET", "")
    if not target and env and parse_target_uri(env) == TARGET:
        target = env
    return target or TARGET


def _run_local_args(target, name, model_uri, flavor, config) -> tuple:
    """Accept both this documented signature and MLflow's call, ``run_local(name, model_uri, flavor, config)``."""
    if config is None and (isinstance(flavor, dict) or model_uri is None or model_uri == FLAVOR):
        return _target_from_cli(), target, name, model_uri, flavor
    return target, name, model_uri, flavor, config


def run_local(target, name, model_uri, flavor=None, config=None) -> None:
    """Deploy into the cache, then serve it with Foundry Local's own web service until Ctrl-C.

    Prints the base URL (``http://127.0.0.1:PORT/catalogs/local/v1``) and the model ID to use as ``model``.

    Args:
        target: ``foundry-local`` or ``foundry-local:/abs/cache``.
        name: deployment name.
        model_uri: ``models:/NAME@alias`` and the other forms ``create_deployment`` takes.
        flavor: None or ``onnx_genai``.
        config: ``-C`` settings; ``port`` picks the web service's port (default: any free port).

    Example:
        >>> run_local("foundry-local:/tmp/cache", "qwen", "models:/qwen@champion")   # doctest: +SKIP
    """
    target, name, model_uri, flavor, config = _run_local_args(target, name, model_uri, flavor, config)
    _serve(target, name, model_uri, flavor, config)


@_friendly
def _serve(target, name, model_uri, flavor, config) -> None:
    from mlflow_slmops.deploy.foundry_local import runtime

    client = FoundryLocalDeploymentClient(target)
    _check_flavor(flavor)
    settings = fconfig.parse_config(config)
    mode = "update" if client.cache.find(fcache.validate_name(name)) else "create"
    deployed = client._deploy(name, model_uri, settings, mode=mode)
    web = f"http://127.0.0.1:{settings.port}" if settings.port is not None else None
    rt = runtime.runtime_for(client.cache.root, web_urls=web)
    urls = rt.serve(deployed["model_id"])
    base = f"{urls[0]}{runtime.LOCAL_ROUTE}" if urls else "(no URL reported)"
    click.echo(f"Foundry Local is serving deployment {name} from {deployed['path']}")
    click.echo(f"  base URL: {base}")
    click.echo(f"  model ID: {deployed['model_id']}")
    click.echo(f"  POST {base}/chat/completions with \"model\": \"{deployed['model_id']}\". Press Ctrl-C to stop.")
    sys.stdout.flush()
    try:
        _wait_for_interrupt()
    finally:
        rt.close()
        click.echo("Stopped Foundry Local's web service.")


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM, even when started with SIGINT ignored (`cmd &` in a script)."""
    def on_signal(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            threading.Event().wait(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def target_help() -> str:
    """The help `mlflow deployments help -t foundry-local` prints: URIs, operations and every -C key."""
    return f"""Deploys onnx_genai models (mlflow_slmops.flavor) into the Foundry Local model cache.

Target URIs:
  foundry-local               the `foundry` CLI's cache (`foundry cache location`), else ~/.foundry/cache/models
  foundry-local:/abs/path     an explicit cache folder

Model URIs: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, or a local MLflow model folder.

Each deployment is <cache>/<publisher>/<name>-<version>/ (Foundry model ID <name>:<version>), registered in
Foundry Local's local catalog as a chat-completion model. create, update (atomic swap), delete (only folders
carrying {fcache.PROVENANCE_FILE}), list, get, predict and run-local (Foundry Local's own web service at
http://127.0.0.1:PORT/catalogs/local/v1) are supported.

predict input (--input-path JSON): {{"messages": [...], "max_tokens": 64}}; with tools, one row per conversation:
  {{"messages": [[{{"role": "user", "content": "..."}}]], "tools": [[{{"type": "function", "function": {{...}}}}]]}}
  A model deployed with tool calling answers with OpenAI-shaped tool_calls.

Config keys (-C key=value):
{fconfig.key_reference()}
"""
