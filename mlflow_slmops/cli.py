"""The `slmops` command line. Thin: parse, call one library function, print.

Every command turns an SlmopsError (and any MlflowException) into one line on stderr and exit code 1,
so a user never sees a traceback for a mistake they can fix.
"""

from __future__ import annotations

import functools
import sys

import click

from mlflow_slmops import __version__
from mlflow_slmops.errors import SlmopsError

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def friendly_errors(fn):
    """Run a command; print a user error as one line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except SlmopsError as exc:
            click.echo(f"Error: {exc.message}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except MlflowException as exc:
            click.echo(f"Error: {' '.join(str(exc.message).split())}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("Interrupted; partial output was removed.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.echo(f"Error: {exc.strerror or exc}{where}; check the path, permissions and free disk space.", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slmops")
def main() -> None:
    """mlflow-slmops: convert, measure, promote and deploy small language models with MLflow."""


@main.command("log-model")
@click.option("--model-dir", required=True, type=click.Path(), help="ONNX Runtime GenAI model folder.")
@click.option("--name", default="model", show_default=True, help="Logged model name.")
@click.option("--registered-model-name", default=None, help="Also register under this name.")
@friendly_errors
def log_model_cmd(model_dir: str, name: str, registered_model_name: str | None) -> None:
    """Log a genai model folder with the onnx_genai flavor in a new MLflow run."""
    import mlflow

    from mlflow_slmops import flavor, tracking

    tracking.configure()
    with mlflow.start_run() as run:
        info = flavor.log_model(model_dir, name=name, registered_model_name=registered_model_name)
    click.echo(f"Logged {info.model_uri} in run {run.info.run_id}")


# --- stage commands are added below, one per stage module ---


if __name__ == "__main__":  # pragma: no cover
    main()
