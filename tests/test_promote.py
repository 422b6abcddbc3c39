"""Promotion: the champion is the best variant that meets the constraints, registered with an alias."""

from __future__ import annotations

import json

import mlflow
import pytest

from mlflow_slmops import flavor, promote
from mlflow_slmops import metrics as M
from mlflow_slmops.errors import SlmopsError
from tests.helpers import assert_one_line_error, slmops

VARIANTS = {
    # name: (status, decode_tok_s, size_mb, ppl_delta_pct, qa_accuracy)
    "fp32": ("ok", 10.0, 100.0, 0.0, 0.99),
    "int8": ("ok", 20.0, 40.0, 1.0, 0.98),
    "int4": ("ok", 35.0, 20.0, 4.0, 0.90),
    "int4-b128-asym": ("ok", 40.0, 18.0, 8.0, 0.80),
    "int4-hqq": ("failed", None, None, None, None),
}


def make_sweep(genai_dir, variants=VARIANTS) -> str:
    """A sweep run with one child per variant, each with its metrics and (when ok) a logged model."""
    with mlflow.start_run(run_name="sweep", tags={M.ROLE_TAG: M.ROLE_SWEEP}) as parent:
        for name, (status, tok_s, size, ppl, qa) in variants.items():
            with mlflow.start_run(run_name=name, nested=True,
                                  tags={M.ROLE_TAG: M.ROLE_VARIANT, M.VARIANT_TAG: name, M.STATUS_TAG: status}):
                if status == "ok":
                    flavor.log_model(genai_dir, name="model")
                    mlflow.log_metrics({M.DECODE_TOK_S: tok_s, M.SIZE_MB: size, M.PPL_DELTA_PCT: ppl,
                                        M.QA_ACCURACY: qa, M.TTFT_MS: 1000 / tok_s, M.KL_DIV: ppl / 100})
    return parent.info.run_id


@pytest.fixture()
def sweep_id(genai_qwen_int4, tracking):
    return make_sweep(genai_qwen_int4)


def test_promote_picks_fastest_within_ppl_budget_and_sets_alias(sweep_id):
    result = promote.promote(sweep_id, "support-bot", constraints=promote.Constraints(max_ppl_delta_pct=5))
    assert result.champion.variant == "int4"  # int4-b128-asym is faster but over the 5% budget
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("support-bot", "champion")
    assert str(version.version) == result.version
    assert version.tags["slmops.variant"] == "int4"
    assert version.tags["slmops.sweep_run_id"] == sweep_id
    assert float(version.tags["metric.decode_tok_s"]) == 35.0
    loaded = mlflow.pyfunc.load_model("models:/support-bot@champion")
    assert loaded.metadata.flavors["onnx_genai"]["model_type"] == "qwen2"


def test_objective_and_qa_constraint_change_the_choice(sweep_id):
    small = promote.promote(sweep_id, "m1", constraints=promote.Constraints(max_ppl_delta_pct=None, objective="size_mb"))
    assert small.champion.variant == "int4-b128-asym"
    accurate = promote.promote(sweep_id, "m2", constraints=promote.Constraints(min_qa_accuracy=0.95))
    assert accurate.champion.variant == "int8"


def test_decision_table_logged_on_sweep_run_with_reasons(sweep_id):
    promote.promote(sweep_id, "support-bot")
    local = mlflow.artifacts.download_artifacts(run_id=sweep_id, artifact_path="promotion/support-bot.json")
    table = json.load(open(local))
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert rows["int4"]["chosen"] is True
    assert "ppl_delta_pct 8 > 5" in rows["int4-b128-asym"]["reason"]
    assert rows["int4-hqq"]["reason"] == "variant failed"


def test_no_variant_meets_constraints_names_the_closest(sweep_id):
    with pytest.raises(SlmopsError, match="closest is fp32 .qa_accuracy 0.99 < 0.995"):
        promote.promote(sweep_id, "x", constraints=promote.Constraints(max_ppl_delta_pct=0.5, min_qa_accuracy=0.995))


def test_promote_cli_prints_champion_and_fails_cleanly(sweep_id):
    ok = slmops("promote", "--sweep-run-id", sweep_id, "--name", "bot", "--objective", "decode_tok_s")
    assert ok.returncode == 0, ok.stderr
    assert "Champion: int4" in ok.stdout and "models:/bot@champion" in ok.stdout
    bad = slmops("promote", "--sweep-run-id", sweep_id, "--name", "bot", "--min-qa-accuracy", "1.5")
    assert_one_line_error(bad, "no variant meets the constraints", "closest is fp32")
    missing = slmops("promote", "--sweep-run-id", "0" * 32, "--name", "bot")
    assert_one_line_error(missing, "was not found")


def _log_metric(sweep_id: str, key: str, values: dict[str, float]) -> None:
    """Log one metric on the named variant runs of a sweep."""
    from mlflow_slmops.sweep import variant_runs

    client = mlflow.MlflowClient()
    for run in variant_runs(client, sweep_id):
        name = run.data.tags[M.VARIANT_TAG]
        if name in values:
            client.log_metric(run.info.run_id, key, values[name])


def test_quality_objective_picks_the_lowest_source_kl_within_the_size_budget(sweep_id):
    _log_metric(sweep_id, M.SRC_KL_MEAN, {"fp32": 1e-12, "int8": 1e-4, "int4": 1e-2, "int4-b128-asym": 3e-2})
    budget = promote.promote(sweep_id, "q1", constraints=promote.Constraints(
        max_ppl_delta_pct=None, objective="quality", max_size_mb=30))
    assert budget.champion.variant == "int4"  # fp32 and int8 are over 30 MB; int4's KL is below int4-b128-asym's
    reasons = {c.variant: c.reasons for c in budget.candidates}
    assert reasons["int8"] == ["size_mb 40 > 30"]
    wider = promote.promote(sweep_id, "q2", constraints=promote.Constraints(
        max_ppl_delta_pct=None, objective="quality", max_size_mb=50))
    assert wider.champion.variant == "int8"
    cli = slmops("promote", "--sweep-run-id", sweep_id, "--name", "q3", "--objective", "quality",
                 "--max-size-mb", "30", "--max-ppl-delta-pct", "100")
    assert cli.returncode == 0, cli.stderr
    assert "Champion: int4 (src_kl_mean 0.01)" in cli.stdout


def test_quality_objective_without_a_size_budget_is_refused(sweep_id):
    proc = slmops("promote", "--sweep-run-id", sweep_id, "--name", "q", "--objective", "quality")
    assert_one_line_error(proc, "objective quality needs a size budget", "--max-size-mb")


def test_tool_call_bar_keeps_variants_whose_calls_break_or_were_never_measured(sweep_id):
    # int4-b128-asym was swept without tool_call questions: no rate is no pass.
    _log_metric(sweep_id, M.TOOL_CALL_VALID_RATE, {"fp32": 0.94, "int8": 0.97, "int4": 0.81})
    result = promote.promote(sweep_id, "agent", constraints=promote.Constraints(
        max_ppl_delta_pct=None, objective="size_mb", min_tool_call_valid_rate=0.95))
    assert result.champion.variant == "int8"  # int4 is smaller but calls its tool validly 81% of the time
    reasons = {c.variant: c.reasons for c in result.candidates}
    assert reasons["int4"] == ["tool_call_valid_rate 0.81 < 0.95"]
    assert reasons["fp32"] == ["tool_call_valid_rate 0.94 < 0.95"]
    assert reasons["int4-b128-asym"] == ["no tool_call_valid_rate"]
    version = mlflow.MlflowClient().get_model_version_by_alias("agent", "champion")
    assert float(version.tags["metric.tool_call_valid_rate"]) == 0.97
    cli = slmops("promote", "--sweep-run-id", sweep_id, "--name", "agent", "--objective", "size_mb",
                 "--max-ppl-delta-pct", "100", "--min-tool-call-valid-rate", "0.99")
    assert_one_line_error(cli, "no variant meets the constraints", "closest is int8 (tool_call_valid_rate 0.97 < 0.99)",
                          "--min-tool-call-valid-rate")
