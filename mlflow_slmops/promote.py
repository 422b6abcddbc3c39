"""Pick the champion of a sweep by stated constraints and register it in the Model Registry with an alias.

The decision is logged on the sweep run as a table of every candidate and why it was accepted or
rejected, so the choice can be audited later in the MLflow UI.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from mlflow_slmops import metrics as M
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.track import tracking

# "quality": the lowest src_kl_mean (fidelity to the Hugging Face source) within the size budget --max-size-mb.
QUALITY_OBJECTIVE = "quality"
OBJECTIVES = (M.DECODE_TOK_S, M.SIZE_MB, M.TTFT_MS, QUALITY_OBJECTIVE)
# The metric each objective ranks on.
OBJECTIVE_METRIC = {M.DECODE_TOK_S: M.DECODE_TOK_S, M.SIZE_MB: M.SIZE_MB, M.TTFT_MS: M.TTFT_MS,
                    QUALITY_OBJECTIVE: M.SRC_KL_MEAN}
DEFAULT_OBJECTIVE = M.DECODE_TOK_S
DEFAULT_ALIAS = "champion"
DEFAULT_MAX_PPL_DELTA_PCT = 5.0
# Metrics copied onto the registered version as tags, so the registry page shows why it won.
VERSION_TAG_METRICS = (M.SIZE_MB, M.BITS_PER_WEIGHT, M.DECODE_TOK_S, M.TTFT_MS, M.PPL_DELTA_PCT, M.KL_DIV,
                       M.SRC_KL_MEAN, M.QA_ACCURACY, M.TOOL_CALL_VALID_RATE, M.PEAK_RSS_MB)


@dataclass(frozen=True)
class Constraints:
    """What a champion must meet, and what it is best at."""

    max_ppl_delta_pct: float | None = DEFAULT_MAX_PPL_DELTA_PCT
    min_qa_accuracy: float | None = None
    objective: str = DEFAULT_OBJECTIVE
    max_size_mb: float | None = None
    # For a model that must call tools: the QA file needs tool_call questions, or no variant has the metric.
    min_tool_call_valid_rate: float | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise SlmopsError(f"objective {self.objective!r} is not supported", f"use one of {', '.join(OBJECTIVES)}")
        for key in ("max_ppl_delta_pct", "min_qa_accuracy", "max_size_mb", "min_tool_call_valid_rate"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
                raise SlmopsError(f"{key} is {value!r}, expected a number", f"pass --{key.replace('_', '-')} N")
        if self.max_size_mb is not None and self.max_size_mb <= 0:
            raise SlmopsError(f"max_size_mb is {self.max_size_mb:g}, expected a size above 0 MB",
                              "pass --max-size-mb with the largest model size you can ship, e.g. 400")
        if self.objective == QUALITY_OBJECTIVE and self.max_size_mb is None:
            raise SlmopsError("objective quality needs a size budget: without one the largest variant (fp32) "
                              "is always the most faithful", "pass --max-size-mb N with --objective quality")

    def limits(self) -> list[tuple[str, float, str, str, float]]:
        """The metric limits set: (metric, limit, the side that breaks it, format, scale of a shortfall)."""
        table = ((M.SIZE_MB, self.max_size_mb, ">", ".4g", self.max_size_mb),
                 (M.PPL_DELTA_PCT, self.max_ppl_delta_pct, ">", ".3g", max(abs(self.max_ppl_delta_pct or 0), 1.0)),
                 (M.QA_ACCURACY, self.min_qa_accuracy, "<", ".3g", max(self.min_qa_accuracy or 0, 1e-9)),
                 (M.TOOL_CALL_VALID_RATE, self.min_tool_call_valid_rate, "<", ".3g",
                  max(self.min_tool_call_valid_rate or 0, 1e-9)))
        return [row for row in table if row[1] is not None]

    @property
    def metric(self) -> str:
        """The metric the objective ranks on (quality: src_kl_mean, lower is better)."""
        return OBJECTIVE_METRIC[self.objective]


@dataclass
class Candidate:
    variant: str
    run_id: str
    status: str
    metrics: dict[str, float]
    accepted: bool = False
    reasons: list[str] = field(default_factory=list)
    chosen: bool = False

    def row(self) -> dict:
        row = {"variant": self.variant, "run_id": self.run_id, "status": self.status,
               "accepted": self.accepted, "chosen": self.chosen, "reason": "; ".join(self.reasons) or "meets all"}
        row.update({k: self.metrics.get(k) for k in VERSION_TAG_METRICS
                    if k not in M.OPTIONAL_METRICS or k in self.metrics})
        return row


@dataclass
class PromotionResult:
    name: str
    version: str
    alias: str
    model_uri: str
    champion: Candidate
    candidates: list[Candidate]

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias, "model_uri": self.model_uri,
                "champion": asdict(self.champion), "candidates": [c.row() for c in self.candidates]}


def judge(candidate: Candidate, constraints: Constraints, build_only: bool) -> None:
    """Fill candidate.accepted and candidate.reasons."""
    m = candidate.metrics
    reasons = []
    if candidate.status != "ok":
        reasons.append("variant failed")
    elif build_only:
        reasons.append("build-only on this machine (not measured)")
    else:
        if constraints.metric not in m:
            reasons.append(f"no {constraints.metric}")
        for key, limit, beyond, fmt, _ in constraints.limits():
            value = m.get(key)
            if value is None:
                reasons.append(f"no {key}")
            elif (value > limit) if beyond == ">" else (value < limit):
                reasons.append(f"{key} {value:{fmt}} {beyond} {limit:g}")
    candidate.reasons = reasons
    candidate.accepted = not reasons


def _shortfall(c: Candidate, constraints: Constraints) -> float:
    """How far a measured candidate is from meeting the constraints (0 = meets them), for the message."""
    m, gap = c.metrics, 0.0
    for key, limit, beyond, _, scale in constraints.limits():
        # A metric never measured is as far off as a limit can be missed: it is no pass.
        gap += max(0.0, (m[key] - limit) if beyond == ">" else (limit - m[key])) / scale if key in m else 1.0
    return gap


def choose(candidates: list[Candidate], constraints: Constraints) -> Candidate:
    """The accepted candidate best on the objective (ties: lower kl_div). Raises naming the closest one."""
    accepted = [c for c in candidates if c.accepted]
    if not accepted:
        measured = [c for c in candidates if c.status == "ok" and c.metrics]
        if not measured:
            raise SlmopsError("no variant of the sweep finished successfully", "fix the failed variants and re-run the sweep")
        closest = min(measured, key=lambda c: _shortfall(c, constraints))
        raise SlmopsError(
            f"no variant meets the constraints; the closest is {closest.variant} ({'; '.join(closest.reasons)})",
            "relax --max-ppl-delta-pct / --min-qa-accuracy / --min-tool-call-valid-rate / --max-size-mb or add "
            "variants to the sweep",
        )
    metric = constraints.metric
    sign = 1 if metric in M.HIGHER_IS_BETTER else -1
    best = max(accepted, key=lambda c: (sign * c.metrics[metric], -c.metrics.get(M.KL_DIV, math.inf)))
    best.chosen = True
    return best


def promote(sweep_run_id: str, name: str, alias: str = DEFAULT_ALIAS,
            constraints: Constraints | None = None, allow_export_mismatch: bool = False) -> PromotionResult:
    """Register the sweep's champion as a new version of ``name`` and point ``alias`` at it.

    Args:
        sweep_run_id: the parent run of a sweep.
        name: the registered model name.
        alias: the alias to set on the new version.
        constraints: what the champion must meet; defaults to ppl_delta_pct <= 5, objective decode_tok_s.
        allow_export_mismatch: promote even when the sweep's fp32 export differs from its Hugging Face source
            (the sweep run is tagged ``slmops.export_mismatch=true``); refused otherwise.

    Example:
        >>> promote("3f2a...", "support-bot", constraints=Constraints(min_qa_accuracy=0.9))  # doctest: +SKIP
    """
    import mlflow

    from mlflow_slmops.sweep import get_sweep_run, variant_runs

    constraints = constraints or Constraints()
    if not name or not name.strip():
        raise SlmopsError("the registered model name is empty", "pass --name NAME")
    if not alias or not alias.replace("_", "").replace("-", "").isalnum():
        raise SlmopsError(f"alias {alias!r} is not valid", "use letters, digits, '-' and '_'")
    tracking.connect()
    client = mlflow.MlflowClient()
    _check_export(get_sweep_run(client, sweep_run_id), allow_export_mismatch)
    candidates = []
    for run in variant_runs(client, sweep_run_id):
        c = Candidate(run.data.tags.get(M.VARIANT_TAG, run.info.run_name), run.info.run_id,
                      run.data.tags.get(M.STATUS_TAG, "failed"), dict(run.data.metrics))
        judge(c, constraints, run.data.tags.get(M.BUILD_ONLY_TAG) == "true")
        candidates.append(c)
    try:
        champion = choose(candidates, constraints)
    finally:
        _log_decision(sweep_run_id, name, candidates)
    version = mlflow.register_model(_model_uri_of(client, champion.run_id), name)
    client.set_registered_model_alias(name, alias, version.version)
    tags = {"slmops.sweep_run_id": sweep_run_id, "slmops.variant": champion.variant,
            "slmops.objective": constraints.objective}
    tags.update({f"metric.{k}": f"{champion.metrics[k]:.6g}" for k in VERSION_TAG_METRICS if k in champion.metrics})
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return PromotionResult(name, str(version.version), alias, f"models:/{name}@{alias}", champion, candidates)


def _check_export(sweep_run, allow_export_mismatch: bool) -> None:
    """A sweep whose fp32 export differs from its source is refused: every variant inherits the export error."""
    if sweep_run.data.tags.get(M.EXPORT_MISMATCH_TAG) != "true" or allow_export_mismatch:
        return
    raise SlmopsError(
        f"sweep run {sweep_run.info.run_id} is tagged {M.EXPORT_MISMATCH_TAG}=true: its fp32 export differs from the "
        "Hugging Face model, so every variant carries that error",
        "check the fp32 run's src_kl_max and src_top1_agreement (docs/troubleshooting.md); "
        "pass --allow-export-mismatch to promote anyway")


def _model_uri_of(client, run_id: str) -> str:
    """The logged model of a variant run (MLflow 3 LoggedModel), as a models:/ URI."""
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}' AND name = 'model'", max_results=1)
    if not found:
        raise SlmopsError(f"variant run {run_id} has no logged model named 'model'", "re-run the sweep for this variant")
    return f"models:/{found[0].model_id}"


def _log_decision(sweep_run_id: str, name: str, candidates: list[Candidate]) -> None:
    import mlflow

    rows = [c.row() for c in candidates]
    table = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    if table:
        mlflow.log_table(table, f"promotion/{name}.json", run_id=sweep_run_id)
