"""The whole flow for one model: convert every variant, measure each in a fresh process, log them as
child runs of one sweep run, and write the comparison (table, Pareto plots, report.md).

Quality is measured twice over: against the sweep's fp32 variant (the quantization error) and against the
user's Hugging Face model itself, run in PyTorch (``source_ref``: the export error and the quantization error
together). When fp32 differs from its source beyond the export tolerance, every run of the sweep is tagged
``slmops.export_mismatch=true`` and ``slmops promote`` refuses it.

Finished measurements are spooled to local JSON before they are logged, so a tracking server that
goes away loses nothing: `slmops sweep --resume PARENT_RUN_ID` replays the spool and measures only the
variants that are missing or failed.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from mlflow_slmops import metrics as M
from mlflow_slmops._files import write_json_atomic
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.track import log, report, tracking
from mlflow_slmops.variants import DEFAULT_VARIANTS

BASELINE_VARIANT = "fp32"
REQUEST_ARTIFACT = "sweep_request.json"
SPOOL_DIRNAME = ".spool"
# Logging retries on top of MLflow's own HTTP retries: attempts and the first back-off.
LOG_ATTEMPTS = 3
LOG_BACKOFF_S = 2.0
# Runs per search request when listing a sweep's variant runs; later pages follow the page token.
SEARCH_PAGE_SIZE = 1000


@dataclass
class SweepRequest:
    """Everything a sweep needs; logged on the parent run so `--resume` can replay it exactly."""

    model: str
    variants: str = DEFAULT_VARIANTS
    variants_file: str | None = None
    output: str | None = None  # None: convert.default_output_dir(model)
    cache_dir: str | None = None
    text: str | None = None
    qa: str | None = None
    prompt_len: int = 128
    gen_len: int = 32
    repeats: int = 5
    trust_remote_code: bool = False
    # Score every variant against the Hugging Face model itself (run once more, in PyTorch).
    source_check: bool = True
    # Calibration text (plain text or QA JSONL) of the calibrated variants; None: the packaged default.
    calibration: str | None = None

    def params(self) -> dict[str, str]:
        return {k: "" if v is None else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "SweepRequest":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class VariantOutcome:
    variant: str
    status: str
    run_id: str | None = None
    output_dir: str | None = None
    build_only: bool = False
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    latency_curve: dict[int, float] = field(default_factory=dict)


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    outcomes: list[VariantOutcome]
    table: Any  # pandas.DataFrame, one row per variant
    report_dir: str
    # Why fp32 differs from the source model beyond the export tolerance; None when it does not (or unchecked).
    export_mismatch: str | None = None
    architecture: str = ""


def machine_fingerprint() -> dict[str, str]:
    """CPU model, core count and RAM: params on every variant run, so results are compared like for like."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine_cpu": cpu,
        "machine_cores": str(psutil.cpu_count(logical=True)),
        "machine_ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
    }


def tool_versions() -> dict[str, str]:
    """The conversion's tool versions (the ones its cache keys on), as run params: ``olive-ai_version``, ..."""
    from mlflow_slmops.convert.recipe import tool_versions as installed

    return {f"{pkg}_version": found for pkg, found in installed().items()}


def with_retry(what: str, fn: Callable[[], Any], resume_hint: str) -> Any:
    """Call an MLflow logging step, retrying with exponential back-off; fail with the run to resume."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    delay = LOG_BACKOFF_S
    for attempt in range(1, LOG_ATTEMPTS + 1):
        try:
            return fn()
        except SlmopsError:
            raise
        except (MlflowException, RequestException, ConnectionError) as exc:
            if attempt == LOG_ATTEMPTS:
                raise SlmopsError(
                    f"logging {what} to the tracking server failed after {LOG_ATTEMPTS} attempts "
                    f"({type(exc).__name__}); finished measurements are kept in the local spool",
                    resume_hint,
                ) from exc
            time.sleep(delay)
            delay *= 2


class Spool:
    """Measurements on local disk, one JSON file per variant, written before they are logged."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, variant: str) -> Path:
        return self.root / f"{variant}.json"

    def write(self, variant: str, payload: dict) -> None:
        write_json_atomic(self.path(variant), payload, default=str)

    def read(self, variant: str) -> dict | None:
        p = self.path(variant)
        return json.loads(p.read_text()) if p.is_file() else None

    def drop(self, variant: str) -> None:
        self.path(variant).unlink(missing_ok=True)


def variant_runs(client, sweep_run_id: str) -> list:
    """Every variant (child) run of a sweep run, paging through the search; errors as `get_sweep_run`."""
    sweep = get_sweep_run(client, sweep_run_id)
    runs, token = [], None
    while True:
        page = client.search_runs(
            [sweep.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{sweep_run_id}' and tags.`{M.ROLE_TAG}` = '{M.ROLE_VARIANT}'",
            max_results=SEARCH_PAGE_SIZE, page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _existing_children(client, parent_run_id: str) -> dict[str, Any]:
    """The variant runs already under a sweep run, by variant name (latest first wins)."""
    by_name: dict[str, Any] = {}
    for run in sorted(variant_runs(client, parent_run_id), key=lambda r: r.info.start_time):
        name = run.data.tags.get(M.VARIANT_TAG)
        if name:
            by_name[name] = run
    return by_name


def get_sweep_run(client, run_id: str):
    """The sweep (parent) run with this ID; one-line errors for an unknown ID or a run of another kind."""
    import mlflow

    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise SlmopsError(f"sweep run {run_id} was not found in {mlflow.get_tracking_uri()}",
                          "pass the run ID `slmops sweep` printed (MLFLOW_TRACKING_URI must match)") from exc
    if run.data.tags.get(M.ROLE_TAG) != M.ROLE_SWEEP:
        raise SlmopsError(f"run {run_id} is not a sweep run (no tag {M.ROLE_TAG}={M.ROLE_SWEEP})",
                          "pass the parent run ID that `slmops sweep` printed")
    return run


def _load_request(client, parent_run_id: str) -> SweepRequest:
    import mlflow

    get_sweep_run(client, parent_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=parent_run_id, artifact_path=REQUEST_ARTIFACT, dst_path=tmp)
        return SweepRequest.from_dict(json.loads(Path(local).read_text()))


def _resolve_specs(req: SweepRequest) -> list:
    from mlflow_slmops import variants

    specs = variants.resolve_variants(req.variants, req.variants_file or None)
    if not any(s.name == BASELINE_VARIANT for s in specs):
        # Quality and compression are measured against fp32, so the sweep always builds it.
        specs = variants.resolve_variants(BASELINE_VARIANT, None) + specs
    return sorted(specs, key=lambda s: s.name != BASELINE_VARIANT)


def _benchmark_config(req: SweepRequest):
    from mlflow_slmops.measure import benchmark

    return benchmark.BenchmarkConfig(prompt_len=req.prompt_len, gen_len=req.gen_len, repeats=req.repeats)


def measure_variant(output_dir: str, req: SweepRequest, baseline_dir: str | None,
                    source_ref: str | None = None) -> dict:
    """Benchmark and evaluate one variant, each in a fresh subprocess. Returns the spool payload."""
    from mlflow_slmops.measure import benchmark, quality

    bench = benchmark.run_benchmark(output_dir, _benchmark_config(req))
    qual = quality.run_evaluate(output_dir, req.text or None, req.qa or None, baseline_dir, source_ref=source_ref)
    return {"benchmark": bench.to_dict(), "quality": qual.to_dict(),
            "metrics": {**bench.metrics(), **qual.metrics()},
            "latency_curve": {int(k): v for k, v in bench.latency_by_prompt_len_ms.items()},
            "qa_rows": getattr(qual, "qa_rows", []), "probe_rows": getattr(qual, "probe_rows", [])}


def _variant_params(spec, conv) -> dict[str, str]:
    d = spec.to_dict()
    params = {"variant": spec.name}
    for key in ("precision", "block_size", "is_symmetric", "algo", "accuracy_level", "execution_provider", "device",
                "embeds_bits", "mixed_precision"):
        params[key] = "" if d.get(key) is None else str(d.get(key))
    if conv.calibration is not None:
        params.update({"calibration_file": conv.calibration.source, "calibration_sha256": conv.calibration.sha256})
    return {**params, **tool_versions(), **machine_fingerprint()}


def _log_variant_run(spec, conv, size_metrics: dict, measured: dict | None, child_run_id: str | None) -> str:
    """One child run: params, tags, the model (onnx_genai), olive_config.json, raw JSON, tables, metrics."""
    import mlflow

    from mlflow_slmops import flavor

    tags = {M.ROLE_TAG: M.ROLE_VARIANT, M.VARIANT_TAG: spec.name}
    with mlflow.start_run(run_id=child_run_id, run_name=None if child_run_id else spec.name, nested=True,
                          tags=None if child_run_id else tags) as child:
        mlflow.set_tags(tags)
        mlflow.log_params(_variant_params(spec, conv))
        if conv.status != "ok":
            mlflow.set_tags({M.STATUS_TAG: "failed", M.ERROR_TAG: (conv.error or "conversion failed")[:4000]})
            return child.info.run_id
        mlflow.set_tag(M.CONVERSION_CACHED_TAG, str(conv.cached).lower())
        if conv.olive_config_path:
            mlflow.log_artifact(conv.olive_config_path)
        info = flavor.log_model(conv.output_dir, name="model",
                                variant={"variant": spec.name, "precision": spec.precision})
        all_metrics = {**size_metrics, **(measured or {}).get("metrics", {})}
        mlflow.log_metrics(all_metrics)
        mlflow.log_metrics(all_metrics, model_id=info.model_id)
        if spec.build_only:
            mlflow.set_tag(M.BUILD_ONLY_TAG, "true")
        if measured:
            _log_measurement_artifacts(measured)
        mlflow.set_tags({M.STATUS_TAG: "ok"})
        return child.info.run_id


def _log_measurement_artifacts(measured: dict) -> None:
    import mlflow

    log.log_latency_curve(measured["latency_curve"])
    mlflow.log_dict(measured["benchmark"], "benchmark.json")
    log.log_quality_artifacts(measured["quality"], measured.get("qa_rows") or [], measured.get("probe_rows") or [])


def _mark_failed(child_run_id: str | None, spec, conv, error: str) -> str:
    import mlflow

    with mlflow.start_run(run_id=child_run_id, run_name=None if child_run_id else spec.name, nested=True) as child:
        mlflow.set_tags({M.ROLE_TAG: M.ROLE_VARIANT, M.VARIANT_TAG: spec.name,
                         M.STATUS_TAG: "failed", M.ERROR_TAG: error[:4000]})
        mlflow.log_params(_variant_params(spec, conv))
        return child.info.run_id


def _outcome_from_run(run, spec) -> VariantOutcome:
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, M.LATENCY_BY_PROMPT_LEN_MS)
    curve = {int(m.step): m.value for m in history}
    return VariantOutcome(
        variant=spec.name, status=run.data.tags.get(M.STATUS_TAG, "failed"), run_id=run.info.run_id,
        build_only=run.data.tags.get(M.BUILD_ONLY_TAG) == "true", error=run.data.tags.get(M.ERROR_TAG),
        metrics=dict(run.data.metrics), latency_curve=curve,
    )


def _table(outcomes: list[VariantOutcome]):
    import pandas as pd

    rows = []
    for o in outcomes:
        row = {"variant": o.variant, "status": o.status, "build_only": o.build_only, "run_id": o.run_id,
               "error": o.error or ""}
        row.update({k: o.metrics.get(k) for k in M.VARIANT_METRICS})
        row.update({k: o.metrics[k] for k in M.OPTIONAL_METRICS if k in o.metrics})
        rows.append(row)
    return pd.DataFrame(rows)


def _log_sweep_artifacts(outcomes: list[VariantOutcome], parent_run_id: str, report_dir: Path):
    import mlflow

    table = _table(outcomes)
    paths = report.write_report(table, report_dir, parent_run_id)
    for p in paths.values():
        mlflow.log_artifact(str(p))
    mlflow.log_table(table.drop(columns=["error"]).astype({"build_only": bool}), "variants_table.json")
    curves = {o.variant: o.latency_curve for o in outcomes if o.latency_curve}
    if curves:
        fig = report.latency_curve_figure(curves)
        mlflow.log_figure(fig, "latency_by_prompt_len.png")
    return table


def run_sweep(req: SweepRequest | None = None, *, resume_run_id: str | None = None,
              progress: bool = True, echo: Callable[[str], None] = print,
              experiment: str | None = None, warn: Callable[[str], None] | None = None) -> SweepResult:
    """Convert, measure and log every variant of req.model under one sweep run.

    Args:
        req: the sweep to run; None with ``resume_run_id`` replays the request logged on that run.
        resume_run_id: an earlier sweep run to complete: variants already logged as ok are kept,
            spooled measurements are replayed, the rest are measured.
        progress: show progress bars.
        echo: where to print the log lines (the CLI passes click.echo).
        experiment: the experiment to log into; None for MLFLOW_EXPERIMENT_NAME or the default one.
        warn: where to print warnings (the CLI passes stderr); None for echo.

    Example:
        >>> run_sweep(SweepRequest(model="./my-finetuned-model", variants="fp32,int4"))  # doctest: +SKIP
    """
    import mlflow

    from mlflow_slmops import convert

    warn = warn or echo
    tracking.configure(experiment)  # a dead tracking server is reported before any conversion work
    client = mlflow.MlflowClient()
    if resume_run_id:
        req = _load_request(client, resume_run_id)
    if req is None:
        raise SlmopsError("no sweep to run", "pass --model, or --resume with a sweep run ID")
    specs = _resolve_specs(req)
    note = _check_inputs(req, specs)
    if note:
        warn(f"Warning: {note}")
    if req.output is None:
        req.output = convert.default_output_dir(req.model, req.cache_dir)
    existing = _existing_children(client, resume_run_id) if resume_run_id else {}

    start_kwargs = {"run_id": resume_run_id} if resume_run_id else {
        "run_name": f"sweep-{Path(req.model).name}", "tags": {M.ROLE_TAG: M.ROLE_SWEEP}}
    with _parent_run(start_kwargs) as parent:
        parent_id = parent.info.run_id
        mlflow.set_tag(M.ROLE_TAG, M.ROLE_SWEEP)
        if not resume_run_id:
            # Under `mlflow run` the project params are logged already, as MLflow quoted them.
            logged = client.get_run(parent_id).data.params
            params = {**req.params(), **tool_versions(), **machine_fingerprint()}
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
            mlflow.log_dict(asdict(req), REQUEST_ARTIFACT)
        echo(f"Sweep run {parent_id} in experiment {parent.info.experiment_id}: "
             f"{', '.join(s.name for s in specs)}")
        outcomes = _sweep_variants(req, specs, existing, parent_id, progress, echo)
        report_dir = Path(req.output) / "report"
        resume_hint = f"run `slmops sweep --resume {parent_id}` when the server is back"
        table = with_retry("the sweep report", lambda: _log_sweep_artifacts(outcomes, parent_id, report_dir),
                           resume_hint)
        mismatch = with_retry("the export guard", lambda: _guard_export(req, table, outcomes, parent_id), resume_hint)
    return SweepResult(parent_id, parent.info.experiment_id, outcomes, table, str(report_dir), mismatch,
                       _architecture(req.model))


def _architecture(model_dir: str) -> str:
    with suppress(OSError, ValueError, IndexError, TypeError):
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    return "this architecture"


def _guard_export(req: SweepRequest, table, outcomes: list[VariantOutcome], parent_id: str) -> str | None:
    """Tag the sweep and every variant run with whether fp32 matches its source; return why not, if not."""
    import mlflow

    client = mlflow.MlflowClient()
    if not req.source_check:
        client.set_tag(parent_id, M.SOURCE_CHECK_TAG, "skipped")
        return None
    client.set_tag(parent_id, M.SOURCE_CHECK_TAG, "ran")
    mismatch = report.export_mismatch(table, BASELINE_VARIANT)
    value = "true" if mismatch else "false"
    for run_id in [parent_id, *(o.run_id for o in outcomes if o.run_id)]:
        client.set_tag(run_id, M.EXPORT_MISMATCH_TAG, value)
    return mismatch


def _check_inputs(req: SweepRequest, specs: list) -> str | None:
    """Bad input shared by every variant fails here, before a sweep run exists (no partial output). Returns a
    known divergence of this architecture's export to tell the user, if any."""
    from mlflow_slmops import convert
    from mlflow_slmops.convert import architectures
    from mlflow_slmops.measure import quality

    config = convert.check_hf_model_dir(req.model, trust_remote_code=req.trust_remote_code)
    convert.check_cache_dir(req.cache_dir)
    if not isinstance(req.source_check, bool):
        raise SlmopsError(f"source_check is {req.source_check!r}, expected true or false",
                          "pass --no-source-check to skip it, or nothing to run it")
    if req.text:
        quality.read_eval_text(req.text)
    if req.qa:
        quality.load_qa(req.qa)
    if req.calibration or any(s.calibrated for s in specs):
        from mlflow_slmops import calibration, data

        calibration.check_disjoint(req.calibration, req.text or data.path(data.EVAL_TEXT),
                                   req.qa or data.path(data.QA_FILE))
    return architectures.check_convertible(config)


@contextmanager
def _parent_run(start_kwargs: dict) -> Iterator[Any]:
    """The sweep run. When the sweep fails, ending the run must not hide why: the server may be gone."""
    import mlflow

    run = mlflow.start_run(**start_kwargs)
    try:
        yield run
    except BaseException:
        with suppress(Exception):
            mlflow.end_run("FAILED")
        raise
    try:
        mlflow.end_run()  # pops the run first, so a retry terminates it by ID
    except Exception:
        with_retry("the end of the sweep run", lambda: mlflow.MlflowClient().set_terminated(run.info.run_id),
                   f"run `slmops sweep --resume {run.info.run_id}` when the server is back")


def _sweep_variants(req, specs, existing, parent_id, progress, echo) -> list[VariantOutcome]:
    """Every conversion first, through the pipeline `slmops convert` uses (cache, validation beside the next
    build); then the source reference and the measurements, one at a time with nothing else running."""
    import mlflow

    from mlflow_slmops import convert
    from mlflow_slmops.progress import sweep_progress

    spool = Spool(Path(req.output) / SPOOL_DIRNAME / parent_id)
    resume_hint = (f"run `slmops sweep --resume {parent_id}` when the tracking server is back "
                   f"(spool: {spool.root})")
    calibration = convert.calibration_for(specs, req.calibration, convert.check_cache_dir(req.cache_dir))
    if calibration is not None:
        with_retry("the calibration data", lambda: _log_calibration(req, calibration, echo), resume_hint)
    started = time.perf_counter()
    convs = convert.convert_variants(req.model, specs, req.output, cache_dir=req.cache_dir,
                                     trust_remote_code=req.trust_remote_code, progress=progress,
                                     calibration=calibration)
    conversion_s = time.perf_counter() - started
    with_retry("the conversion time", lambda: mlflow.log_metric(M.CONVERSION_S, conversion_s), resume_hint)
    for conv in convs:
        echo(f"  {conv.spec.name}: {conv.status} -> {conv.output_dir or conv.error}")
    parameters = _parameter_count(req.model)
    baseline = next((c for c in convs if c.spec.name == BASELINE_VARIANT and c.status == "ok"), None)
    baseline_dir, baseline_size = (baseline.output_dir, baseline.size_bytes) if baseline else (None, None)
    outcomes: list[VariantOutcome] = []
    with sweep_progress(len(specs), enabled=progress) as bar:
        source_ref = _source_reference(req, parent_id, bar, echo) if req.source_check else None
        for spec, conv in zip(specs, convs):
            prior = existing.get(spec.name)
            if prior is not None and prior.data.tags.get(M.STATUS_TAG) == "ok":
                outcomes.append(_outcome_from_run(prior, spec))
            else:
                outcomes.append(_run_one(req, spec, conv, baseline_dir, baseline_size, spool,
                                         prior.info.run_id if prior else None, resume_hint, bar, source_ref,
                                         parameters))
            bar.advance()
    return outcomes


def _log_calibration(req: SweepRequest, calibration, echo: Callable[[str], None]) -> None:
    """Name the calibration data on the sweep run: its file, stored copy, sha256, and the samples Olive sees."""
    import mlflow

    from mlflow_slmops import calibration as calibration_module

    samples = calibration_module.count_samples(calibration, req.model, req.trust_remote_code)
    echo(f"  calibration: {calibration.source} ({samples} samples of up to {calibration_module.SAMPLE_TOKENS} "
         f"tokens, sha256 {calibration.sha256[:12]}) -> {calibration.path}")
    logged = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
    params = {"calibration_file": calibration.source, "calibration_copy": calibration.path,
              "calibration_sha256": calibration.sha256}
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})  # a --resume logged them already
    mlflow.log_metric(M.CALIBRATION_SAMPLES, samples)


def _parameter_count(model_dir: str) -> int | None:
    """The source model's parameter count for bits_per_weight; None (no such metric) without safetensors."""
    from mlflow_slmops.genai import weights

    try:
        return weights.parameter_count(model_dir)
    except SlmopsError:
        return None


def _convert_seconds(conv) -> float:
    """A variant reused from the conversion cache reports the build time it took when it was cached."""
    return conv.build_s if conv.cached and conv.build_s is not None else conv.convert_s


def _source_reference(req: SweepRequest, parent_id: str, bar, echo: Callable[[str], None]) -> str:
    """Run the Hugging Face model over the evaluation chunks once (or reuse that run); log what it cost."""
    import mlflow

    from mlflow_slmops.measure import quality

    bar.stage("source model", "reference logits")
    ref = quality.source_reference_for(req.model, req.text or None, quality.QualityConfig(), req.cache_dir,
                                       trust_remote_code=req.trust_remote_code)
    meta = ref.meta
    echo(f"  source model: {meta['architecture']} ({meta['source_dtype']}, computed in fp32), "
         f"{meta['chunks']} chunks of {meta['chunk_tokens']} tokens -> {ref.path}")

    def log_reference() -> None:
        mlflow.log_params({"source_dtype": meta["source_dtype"], "source_parameters": str(meta["parameters"]),
                           "source_ref": str(ref.path)})
        mlflow.log_metric(M.SOURCE_CHECK_S, meta["seconds"])

    with_retry("the source reference", log_reference,
               f"run `slmops sweep --resume {parent_id}` when the tracking server is back")
    return str(ref.path)


def _run_one(req, spec, conv, baseline_dir, baseline_size, spool, child_id, resume_hint, bar,
             source_ref: str | None = None, parameters: int | None = None) -> VariantOutcome:
    from mlflow_slmops.genai import weights

    size_metrics = {}
    if conv.status == "ok":
        size_metrics = {M.SIZE_MB: conv.size_bytes / 2**20, M.CONVERT_S: _convert_seconds(conv)}
        if parameters:
            size_metrics[M.BITS_PER_WEIGHT] = weights.bits_per_weight(conv.output_dir, parameters)
        if baseline_size:
            size_metrics[M.COMPRESSION_RATIO] = baseline_size / conv.size_bytes
    measured = spool.read(spec.name)
    error = None
    if conv.status == "ok" and not spec.build_only and measured is None:
        bar.stage(spec.name, "measure")
        try:
            measured = measure_variant(conv.output_dir, req, baseline_dir, source_ref)
            spool.write(spec.name, measured)
        except SlmopsError as exc:
            error = f"measurement failed: {exc.message}"
    bar.stage(spec.name, "log")
    if error:
        run_id = with_retry(spec.name, lambda: _mark_failed(child_id, spec, conv, error), resume_hint)
        return VariantOutcome(spec.name, "failed", run_id, conv.output_dir, spec.build_only, error)
    run_id = with_retry(spec.name, lambda: _log_variant_run(spec, conv, size_metrics, measured, child_id), resume_hint)
    if conv.status == "ok":  # a failed conversion logs no metrics: keep the measurement for a later resume
        spool.drop(spec.name)
    status = "ok" if conv.status == "ok" else "failed"
    return VariantOutcome(spec.name, status, run_id, conv.output_dir, spec.build_only, conv.error,
                          {**size_metrics, **(measured or {}).get("metrics", {})},
                          (measured or {}).get("latency_curve", {}))
