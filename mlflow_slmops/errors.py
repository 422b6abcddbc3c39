"""The one user-facing error type. The CLI prints it as one line and exits non-zero.

``SlmopsError`` is an ``MlflowException``, and ``import mlflow`` takes about a second. The conversion path
(``convert``, ``variants``, ``modeldir``, the ``slmops convert`` command) never needs MLflow, and a fully cached
sweep is otherwise done in a fraction of that second. So this module builds the class on first use (PEP 562):
``from mlflow_slmops.errors import SlmopsError`` works as ever and imports MLflow, while the conversion path
imports this module and names ``errors.SlmopsError`` where it raises or catches one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow_slmops._error_class import SlmopsError

__all__ = ["SlmopsError"]


def __getattr__(name: str):
    if name != "SlmopsError":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mlflow_slmops._error_class import SlmopsError as cls

    globals()["SlmopsError"] = cls  # later look-ups find it directly
    return cls
