"""mlflow-slmops: fine-tuned small language models to measured, registered Foundry Local deployments."""

__version__ = "0.1.0"
