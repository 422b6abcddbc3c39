"""mlflow-slmops: fine-tuned small language models to measured, registered Foundry Local deployments."""

__version__ = "0.1.0"

from mlflow_slmops import _moved

_moved.install()  # the flat layout's import paths (mlflow_slmops.modeldir, mlflow_slmops.deployment, ...) still work
