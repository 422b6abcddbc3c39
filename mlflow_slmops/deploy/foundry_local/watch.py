"""Keep a foundry-local deployment on the model version a registry alias points at.

``slmops watch --name qwen-support --alias champion -t foundry-local:/cache`` polls the registry; when the alias
has moved (or nothing is deployed yet), it deploys the new version through the target's own
``update_deployment`` (or ``create_deployment``), the same atomic swap ``mlflow deployments update`` does, so a
reader of the cache sees the old model or the new one, never a mix. Polling, rather than an MLflow webhook, works
with every tracking store (sqlite, a file store, a remote ``mlflow server``) and needs no inbound port.

Example:
    >>> for event in watch("qwen-support", "champion", "foundry-local:/tmp/cache", polls=1):  # doctest: +SKIP
    ...     print(event.action, event.version)
    create 3
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from mlflow_slmops.errors import SlmopsError

DEFAULT_INTERVAL_S = 30.0
MAX_REASON_CHARS = 200  # the registry's own reason, shortened to keep the error one line


@dataclass(frozen=True)
class WatchEvent:
    """One poll: what the alias points at and what was done (create, update or none)."""

    action: str
    version: str | None
    deployment: dict | None
    error: str | None = None


def _alias_version(client, name: str, alias: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        why = " ".join(str(exc.message).split())[:MAX_REASON_CHARS]
        raise SlmopsError(f"registered model {name} has no alias {alias} ({why})",
                          f"set it with `slmops promote --name {name} --alias {alias}` or check the name")


def poll_once(name: str, alias: str, target: str, deployment: str | None = None) -> WatchEvent:
    """Deploy ``models:/name/<version of alias>`` as ``deployment`` unless that version is what is deployed."""
    from mlflow import MlflowClient
    from mlflow.deployments import get_deploy_client

    deployment = deployment or name
    version = _alias_version(MlflowClient(), name, alias)
    client = get_deploy_client(target)
    current = client.cache.find(deployment) if hasattr(client, "cache") else None
    prov = current.provenance if current else None
    if prov and prov.registered_model_name == name and str(prov.registered_model_version) == version:
        return WatchEvent("none", version, None)
    uri = f"models:/{name}/{version}"
    if current is None:
        return WatchEvent("create", version, client.create_deployment(deployment, uri))
    return WatchEvent("update", version, client.update_deployment(deployment, uri))


def watch(name: str, alias: str, target: str, deployment: str | None = None, interval: float = DEFAULT_INTERVAL_S,
          polls: int | None = None) -> Iterator[WatchEvent]:
    """Poll every ``interval`` seconds, ``polls`` times (forever when None), yielding each poll's event.

    Args:
        name: registered model name.
        alias: the alias to follow, e.g. ``champion``.
        target: ``foundry-local`` or ``foundry-local:/abs/cache``.
        deployment: the deployment name; the registered model name by default.
        interval: seconds between polls.
        polls: how many polls before returning; None polls until interrupted.

    A poll that fails (the alias is missing, the new version fails its pre-flight) yields a ``failed`` event
    with the one-line message and leaves the deployment as it was; the next poll tries again.
    """
    done = 0
    while polls is None or done < polls:
        if done:
            time.sleep(interval)
        try:
            yield poll_once(name, alias, target, deployment)
        except SlmopsError as exc:  # a bad version (or an unreachable server) must not end the watch
            yield WatchEvent("failed", None, None, exc.message)
        done += 1
