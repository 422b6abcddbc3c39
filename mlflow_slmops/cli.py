"""The `slmops` command line. Thin: parse, call one library function, print.

Every command turns an SlmopsError (and any MlflowException) into one line on stderr and exit code 1,
so a user never sees a traceback for a mistake they can fix.
"""

from __future__ import annotations

import functools
import sys

import click

from mlflow_slmops import __version__, errors
from mlflow_slmops.variants import DEFAULT_VARIANTS

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
# Rich assumes 80 columns when stdout is not a terminal; tables of metrics need more.
TABLE_WIDTH_PIPED = 200


def friendly_errors(fn):
    """Run a command; print a user error as one line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # The except clauses name their classes only when an exception arrives: `slmops convert` imports
        # MLflow (a second) only if it has an MLflow error to print (see mlflow_slmops/errors.py).
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("Interrupted; partial output was removed.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except SystemExit:
            raise
        except errors.SlmopsError as exc:
            click.echo(f"Error: {exc.message}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except _mlflow_exception() as exc:
            click.echo(f"Error: {' '.join(str(exc.message).split())}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as exc:
            # A copy names its source first and its destination second: the destination is what failed to write.
            target = getattr(exc, "filename2", None) or getattr(exc, "filename", None)
            where = f" ({target})" if target else ""
            click.echo(f"Error: {exc.strerror or exc}{where}; check the path, permissions and free disk space.", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _mlflow_exception() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    return MlflowException


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slmops")
def main() -> None:
    """mlflow-slmops: convert, measure, promote and deploy small language models with MLflow."""
    from mlflow_slmops import convert

    convert.own_this_process()  # this process is ours: conversions may tune its heap for speed


@main.command("log-model")
@click.option("--model-dir", required=True, type=click.Path(), help="ONNX Runtime GenAI model folder.")
@click.option("--name", default="model", show_default=True, help="Logged model name.")
@click.option("--registered-model-name", default=None, help="Also register under this name.")
@friendly_errors
def log_model_cmd(model_dir: str, name: str, registered_model_name: str | None) -> None:
    """Log a genai model folder with the onnx_genai flavor in a new MLflow run."""
    import mlflow

    from mlflow_slmops import flavor
    from mlflow_slmops.genai import modeldir
    from mlflow_slmops.track import tracking

    modeldir.check_genai_dir(model_dir)  # a bad folder must not leave a failed run behind
    tracking.configure()
    with mlflow.start_run() as run:
        info = flavor.log_model(model_dir, name=name, registered_model_name=registered_model_name)
    click.echo(f"Logged {info.model_uri} in run {run.info.run_id}")


class WholeNumber(click.ParamType):
    """An integer that also accepts MLproject float params such as "128.0"."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if number != int(number) or number < 0:
            self.fail(f"{value!r} is not a whole number >= 0", param, ctx)
        return int(number)


def _blank_to_none(ctx, param, value):
    """MLproject passes empty strings for unset optional params."""
    return value or None


def _print_table(df, columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    cols = [c for c in columns if c in df.columns]
    console = Console() if sys.stdout.isatty() else Console(width=TABLE_WIDTH_PIPED)
    for c in cols:
        table.add_column(c, justify="left" if c in ("variant", "status") else "right")
    for _, row in df.iterrows():
        table.add_row(*[_cell(row[c]) for c in cols])
    console.print(table)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SWEEP_TABLE_COLUMNS = ["variant", "status", "size_mb", "bits_per_weight", "compression_ratio", "decode_tok_s", "ttft_ms",
                       "peak_rss_mb", "ppl_delta_pct", "kl_div", "src_kl_mean", "src_kl_max", "src_top1_agreement",
                       "qa_accuracy", "tool_call_valid_rate"]


@main.command("sweep")
@click.option("--model", type=click.Path(), default=None, help="Hugging Face model folder (the fine-tuned model).")
@click.option("--variants", default=DEFAULT_VARIANTS, show_default=True,
              help="Comma-separated preset or variants-file names.")
@click.option("--variants-file", default=None, callback=_blank_to_none, help="YAML or JSON file of custom variants.")
@click.option("--output", default=None, callback=_blank_to_none,
              help="Where variant folders are written (default .slmops/variants/<model folder name>-<content hash>).")
@click.option("--cache-dir", default=None, callback=_blank_to_none, help="Conversion cache (default ~/.cache/mlflow-slmops).")
@click.option("--text", default=None, callback=_blank_to_none, help="Perplexity text file (default: bundled).")
@click.option("--qa", default=None, callback=_blank_to_none, help="QA JSONL file (default: bundled).")
@click.option("--calibration", default=None, callback=_blank_to_none,
              help="Calibration text of the calibrated variants (int4-gptq, int4-e8, int4-mixed): plain text or a "
                   "QA JSONL file, never the evaluation text or QA file (default: bundled).")
@click.option("--prompt-len", type=WholeNumber(), default=128, show_default=True)
@click.option("--gen-len", type=WholeNumber(), default=32, show_default=True)
@click.option("--repeats", type=WholeNumber(), default=5, show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow models that need custom code (off by default).")
@click.option("--no-source-check", is_flag=True,
              help="Do not run the Hugging Face model to score variants against it (for models too large to run "
                   "twice); the sweep run is tagged slmops.source_check=skipped.")
# For MLproject, which cannot leave a flag out: --source-check false is --no-source-check.
@click.option("--source-check", "source_check_value", type=click.BOOL, default=True, hidden=True)
@click.option("--resume", "resume_run_id", default=None, help="Complete an earlier sweep run: measure only what is missing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def sweep_cmd(model, variants, variants_file, output, cache_dir, text, qa, calibration, prompt_len, gen_len, repeats,
              trust_remote_code, no_source_check, source_check_value, resume_run_id, quiet) -> None:
    """Convert, measure and log every variant under one MLflow sweep run."""
    from mlflow_slmops import sweep

    if not model and not resume_run_id:
        raise errors.SlmopsError("no model given", "pass --model PATH (or --resume RUN_ID)")
    req = None if resume_run_id else sweep.SweepRequest(
        model=model, variants=variants, variants_file=variants_file, output=output, cache_dir=cache_dir,
        text=text, qa=qa, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats,
        trust_remote_code=trust_remote_code, source_check=source_check_value and not no_source_check,
        calibration=calibration)
    result = sweep.run_sweep(req, resume_run_id=resume_run_id, progress=not quiet, echo=click.echo,
                             warn=functools.partial(click.echo, err=True))
    _print_table(result.table, SWEEP_TABLE_COLUMNS)
    click.echo(f"Report: {result.report_dir}/report.md")
    click.echo(f"Sweep run ID: {result.parent_run_id}")
    if result.export_mismatch:
        click.echo(f"Warning: the fp32 export of {result.architecture} differs from the Hugging Face model "
                   f"({result.export_mismatch}); every variant inherits the error, and `slmops promote` refuses "
                   "this sweep without --allow-export-mismatch (see docs/troubleshooting.md).", err=True)
    failed = [o.variant for o in result.outcomes if o.status != "ok"]
    if failed:
        click.echo(f"Failed variants: {', '.join(failed)} (see the slmops.error tag on their runs)", err=True)
    if len(failed) == len(result.outcomes):
        sys.exit(EXIT_USER_ERROR)


@main.command("promote")
@click.option("--sweep-run-id", required=True, help="The sweep's parent run ID.")
@click.option("--name", required=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True)
@click.option("--max-ppl-delta-pct", type=float, default=5.0, show_default=True,
              help="Largest perplexity increase over fp32 allowed, in percent.")
@click.option("--min-qa-accuracy", type=float, default=None, help="Smallest QA accuracy allowed (0 to 1).")
@click.option("--min-tool-call-valid-rate", type=float, default=None,
              help="Smallest tool_call_valid_rate allowed (0 to 1; the sweep's QA file needs tool_call questions).")
@click.option("--objective", type=click.Choice(["decode_tok_s", "size_mb", "ttft_ms", "quality"]),
              default="decode_tok_s", show_default=True,
              help="What the champion is best at among those that meet the constraints; quality: the lowest "
                   "src_kl_mean (closest to the Hugging Face model) within --max-size-mb.")
@click.option("--max-size-mb", type=float, default=None,
              help="Largest variant size allowed, in MB (the size budget; required by --objective quality; 0: none).")
@click.option("--allow-export-mismatch", is_flag=True,
              help="Promote from a sweep whose fp32 export differs from the Hugging Face model (tagged "
                   "slmops.export_mismatch=true); refused without it.")
@friendly_errors
def promote_cmd(sweep_run_id, name, alias, max_ppl_delta_pct, min_qa_accuracy, min_tool_call_valid_rate, objective,
                max_size_mb, allow_export_mismatch) -> None:
    """Register the sweep's champion in the Model Registry and set an alias on it."""
    import pandas as pd

    from mlflow_slmops import promote

    constraints = promote.Constraints(max_ppl_delta_pct, min_qa_accuracy or None, objective, max_size_mb or None,
                                      min_tool_call_valid_rate or None)
    result = promote.promote(sweep_run_id, name, alias, constraints, allow_export_mismatch=allow_export_mismatch)
    _print_table(pd.DataFrame([c.row() for c in result.candidates]),
                 ["variant", "accepted", "chosen", "decode_tok_s", "size_mb", "bits_per_weight", "src_kl_mean",
                  "ppl_delta_pct", "qa_accuracy", "tool_call_valid_rate", "reason"])
    click.echo(f"Champion: {result.champion.variant} ({constraints.metric} "
               f"{result.champion.metrics.get(constraints.metric, float('nan')):.4g}) "
               f"-> {result.name} version {result.version}, alias @{result.alias}")
    click.echo(f"Model URI: {result.model_uri}")


# --- stage commands are added below, one per stage module ---


@main.command("convert")
@click.option("--model", required=True, type=click.Path(), help="Hugging Face model folder (the fine-tuned model).")
@click.option("--variants", default=DEFAULT_VARIANTS, show_default=True,
              help="Comma list of presets and/or names from --variants-file.")
@click.option("--output", default=None, callback=_blank_to_none,
              help="Parent folder of the variant folders (default .slmops/variants/<model folder name>-<content hash>).")
@click.option("--variants-file", default=None, callback=_blank_to_none, help="YAML or JSON file of custom variants.")
@click.option("--cache-dir", default=None, callback=_blank_to_none,
              help="Conversion cache (default $SLMOPS_CACHE_DIR or ~/.cache/mlflow-slmops).")
@click.option("--trust-remote-code", is_flag=True, help="Allow models that need custom code (off by default).")
@click.option("--calibration", default=None, callback=_blank_to_none,
              help="Calibration text of the calibrated variants (int4-gptq, int4-e8, int4-mixed): plain text or a "
                   "QA JSONL file (default: bundled).")
@click.option("--copy", "copy_files", is_flag=True,
              help="Copy files from the cache instead of hardlinking them (for tools such as onnx.load that "
                   "refuse hardlinked external data).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def convert_cmd(model, variants, output, variants_file, cache_dir, trust_remote_code, calibration, copy_files,
                quiet) -> None:
    """Convert a Hugging Face model into ONNX Runtime GenAI variants with Olive, one folder per variant."""
    from rich.console import Console

    from mlflow_slmops import convert
    from mlflow_slmops.convert import architectures
    from mlflow_slmops.variants import resolve_variants

    specs = resolve_variants(variants, variants_file)
    note = architectures.check_convertible(convert.check_hf_model_dir(model, trust_remote_code))
    if note:
        click.echo(f"Warning: {note}", err=True)
    if output is None:
        output = convert.default_output_dir(model, cache_dir)
    results = convert.convert_variants(model, specs, output, cache_dir=cache_dir,
                                       trust_remote_code=trust_remote_code, progress=not quiet,
                                       link=not copy_files, calibration=calibration)
    Console(width=200).print(convert.results_table(results))
    if not any(r.status == convert.STATUS_OK for r in results):
        causes = {r.error for r in results}
        failed = f"every variant failed ({', '.join(r.spec.name for r in results)})"
        if len(causes) == 1:  # one cause (a full disk, a read-only output): say it, with its fix
            raise errors.SlmopsError(f"{failed}: {causes.pop()}")
        raise errors.SlmopsError(failed, "read each variant's error in the table above")


def _print_metrics(title: str, values: dict[str, float]) -> None:
    """A two-column rich table of metric name and value."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, _cell(value))
    Console().print(table)


def _write_json(path: str | None, payload: dict) -> None:
    import json
    from pathlib import Path

    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        click.echo(f"Wrote {path}")


@main.command("benchmark")
@click.option("--model-dir", required=True, type=click.Path(), help="ONNX Runtime GenAI model folder.")
@click.option("--prompt-len", type=WholeNumber(), default=128, show_default=True, help="Prompt tokens.")
@click.option("--gen-len", type=WholeNumber(), default=32, show_default=True, help="New tokens per generation.")
@click.option("--repeats", type=WholeNumber(), default=5, show_default=True, help="Timed generations.")
@click.option("--warmup", type=WholeNumber(), default=2, show_default=True, help="Untimed generations first.")
@click.option("--prompt-lens", default="32,128,512", show_default=True,
              help="Comma-separated prompt lengths of the latency curve (those beyond the context are skipped).")
@click.option("--json", "json_path", default=None, callback=_blank_to_none, help="Also write the result as JSON.")
@click.option("--no-log", is_flag=True, help="Do not log an MLflow run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def benchmark_cmd(model_dir, prompt_len, gen_len, repeats, warmup, prompt_lens, json_path, no_log, quiet) -> None:
    """Measure speed, memory and CPU of one genai folder in a fresh subprocess."""
    from mlflow_slmops.measure import benchmark, worker
    from mlflow_slmops.track import log, tracking

    try:
        lens = tuple(int(float(x)) for x in prompt_lens.split(",") if x.strip())
    except ValueError:
        raise errors.SlmopsError(f"--prompt-lens {prompt_lens!r} is not a comma-separated list of integers",
                                 "pass for example --prompt-lens 32,128,512")
    config = benchmark.BenchmarkConfig(prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, warmup=warmup,
                                       prompt_lens=lens)
    if not no_log:
        tracking.configure()  # an unreachable server is reported before the measuring starts
    with worker.rich_progress(not quiet) as on_progress:
        result = benchmark.run_benchmark(model_dir, config, on_progress=on_progress)
    _print_metrics(f"benchmark: {model_dir}", {**result.metrics(), **{
        f"{k}@{n}": v for k, v, n in result.step_metrics()}})
    for length, reason in result.skipped_prompt_lens.items():
        click.echo(f"Skipped prompt length {length}: {reason}.", err=True)
    _write_json(json_path, result.to_dict())
    if not no_log:
        click.echo(f"Logged run {log.log_benchmark_run(result)}")


@main.command("evaluate")
@click.option("--model-dir", required=True, type=click.Path(), help="ONNX Runtime GenAI model folder.")
@click.option("--text", default=None, callback=_blank_to_none, help="Perplexity text file (default: bundled).")
@click.option("--qa", default=None, callback=_blank_to_none, help="QA JSONL file (default: bundled).")
@click.option("--baseline", default=None, callback=_blank_to_none,
              help="fp32 genai folder to compare against (kl_div, top1_agreement, ppl_delta_pct).")
@click.option("--source-model", default=None, callback=_blank_to_none,
              help="The Hugging Face model folder the variant was converted from: adds the src_* figures against it.")
@click.option("--cache-dir", default=None, callback=_blank_to_none,
              help="Where the source reference is kept (default $SLMOPS_CACHE_DIR or ~/.cache/mlflow-slmops).")
@click.option("--chunk-tokens", type=WholeNumber(), default=128, show_default=True, help="Perplexity chunk size.")
@click.option("--json", "json_path", default=None, callback=_blank_to_none, help="Also write the result as JSON.")
@click.option("--no-log", is_flag=True, help="Do not log an MLflow run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def evaluate_cmd(model_dir, text, qa, baseline, source_model, cache_dir, chunk_tokens, json_path, no_log,
                 quiet) -> None:
    """Measure quality of one genai folder: perplexity, KL and top-1 vs a baseline and the source, QA, format, edge cases."""
    from mlflow_slmops.measure import quality, worker
    from mlflow_slmops.track import log, tracking

    config = quality.QualityConfig(chunk_tokens=chunk_tokens)
    if not no_log:
        tracking.configure()
    with worker.rich_progress(not quiet) as on_progress:
        source = quality.source_reference_for(source_model, text, config, cache_dir, on_progress) \
            if source_model else None
        source_ref = str(source.path) if source else None
        result = quality.run_evaluate(model_dir, text, qa, baseline, config, on_progress=on_progress,
                                      source_ref=source_ref)
    _print_metrics(f"quality: {model_dir}", result.metrics())
    for row in result.probe_rows:
        click.echo(f"probe {row['probe']}: {'pass' if row['passed'] else 'FAIL'} ({row['outcome']}: {row['detail']})")
    _write_json(json_path, result.to_dict())
    if not no_log:
        click.echo(f"Logged run {log.log_quality_run(result)}")


@main.command("watch")
@click.option("--name", required=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True, help="The alias to follow.")
@click.option("-t", "--target", required=True, help="Deployment target, e.g. foundry-local:/abs/cache.")
@click.option("--deployment", default=None, callback=_blank_to_none, help="Deployment name (default: --name).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds between polls of the registry.")
@click.option("--once", is_flag=True, help="Poll once and exit.")
@click.option("--polls", type=WholeNumber(), default=None, help="Stop after this many polls (default: until Ctrl-C).")
@friendly_errors
def watch_cmd(name, alias, target, deployment, interval, once, polls) -> None:
    """Redeploy NAME@ALIAS to the target whenever the alias moves, through the target's atomic update."""
    from mlflow_slmops.deploy.foundry_local import watch

    click.echo(f"Watching {name}@{alias} for {target} (every {interval:g} s)")
    failed = False
    for event in watch.watch(name, alias, target, deployment, interval, 1 if once else polls):
        failed = event.action == "failed"
        if failed:
            click.echo(f"Error: {event.error}", err=True)
        elif event.action == "none":
            click.echo(f"{name}@{alias} is version {event.version}: deployed already")
        else:
            click.echo(f"{name}@{alias} is version {event.version}: {event.action}d {event.deployment['model_id']} "
                       f"at {event.deployment['path']}")
        sys.stdout.flush()
    if failed:
        sys.exit(EXIT_USER_ERROR)  # the last poll failed: a script running --once sees it


if __name__ == "__main__":  # pragma: no cover
    main()
