"""The class behind ``mlflow_slmops.errors.SlmopsError``; import it from there (see errors.py for why)."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class SlmopsError(MlflowException):
    """An error the user can fix: says what was wrong with which input, and what to do.

    It is an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, so ``mlflow models serve`` answers it
    with HTTP 400 and MLflow's own CLIs print it without a traceback.

    Args:
        message: what was expected and what was found, naming the offending input.
        hint: the fix, as an imperative sentence.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.detail = message
        self.hint = hint
        super().__init__(self._one_line(message, hint), error_code=INVALID_PARAMETER_VALUE)

    @staticmethod
    def _one_line(message: str, hint: str | None) -> str:
        text = message.rstrip(".")
        if hint:
            text += f"; {hint.rstrip('.')}"
        return " ".join((text + ".").split())

    def one_line(self) -> str:
        return self.message


SlmopsError.__module__ = "mlflow_slmops.errors"  # its public home: reprs, pickles and docs name that
