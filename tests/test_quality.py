"""The quality stage: perplexity, KL and top-1 against a baseline, QA, format validity, edge-case probes."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest

from mlflow_slmops import metrics
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.flavor import GenaiModel
from mlflow_slmops.measure import quality
from mlflow_slmops.measure.quality import QaItem, QualityConfig, judge
from tests.helpers import assert_one_line_error, slmops

# Few chunks: enough positions for the comparisons to mean something, quick on a shared CPU.
FEW_CHUNKS = QualityConfig(chunk_tokens=64, max_chunks=4, qa_max_new_tokens=4)


@pytest.fixture(scope="module")
def small_qa(tmp_path_factory):
    """One question that any answer gets right and one that none does: accuracy is exactly 0.5."""
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text(
        json.dumps({"prompt": "Name a colour.", "expected": "(?s)^.*$", "match": "regex"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}], "expected": "zzq-never", "match": "contains"})
        + "\n")
    return path


@pytest.fixture(scope="module")
def int4_vs_fp32(genai_qwen_int4, genai_qwen_fp32):
    """The full default evaluation (bundled text and QA) in a fresh subprocess, as the sweep runs it."""
    return quality.run_evaluate(genai_qwen_int4, baseline_dir=genai_qwen_fp32,
                                config=QualityConfig(max_chunks=4, qa_max_new_tokens=4))


def test_genai_returns_causal_logits_for_every_appended_position(genai_qwen_fp32):
    model = GenaiModel(genai_qwen_fp32)
    ids = [int(t) for t in model.tokenizer.encode("The quick brown fox jumps over the lazy dog again and again.")]
    full = quality.chunk_logits(model.model, ids)
    assert full.shape == (len(ids), 512)
    # Position 5 of the whole chunk is what a forward pass over the first 6 tokens predicts.
    prefix = quality.chunk_logits(model.model, ids[:6])
    np.testing.assert_allclose(full[5], prefix[5], rtol=1e-4, atol=1e-4)


def _reference_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_scorer_matches_a_float64_reference_for_logprob_kl_and_top1():
    rng = np.random.default_rng(0)
    rows, vocab = 16, 4096
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * 3
    base = logits + rng.standard_normal((rows, vocab), dtype=np.float32) * 0.3
    chunk = [int(t) for t in rng.integers(0, vocab, rows)]
    got = quality.LogitScorer().compare(logits, base, chunk)
    lx, lb = _reference_log_softmax(logits), _reference_log_softmax(base)
    nxt = np.arange(rows - 1), np.asarray(chunk[1:])
    np.testing.assert_allclose(got["logp"], lx[nxt], atol=1e-4)
    np.testing.assert_allclose(got["base_logp"], lb[nxt], atol=1e-4)
    np.testing.assert_allclose(got["kl"], (np.exp(lb) * (lb - lx)).sum(axis=-1), rtol=1e-3)
    np.testing.assert_array_equal(got["agree"], logits.argmax(axis=-1) == base.argmax(axis=-1))
    assert not got["agree"].all()  # the noise is large enough to flip some argmaxes


def test_fp32_against_itself_gives_zero_kl_and_full_top1_agreement(genai_qwen_fp32, small_qa):
    result = quality.evaluate(genai_qwen_fp32, qa_path=small_qa, baseline_dir=genai_qwen_fp32, config=FEW_CHUNKS)
    assert abs(result.kl_div) < 1e-6
    assert result.top1_agreement == 1.0
    assert result.ppl_delta_pct == pytest.approx(0.0, abs=1e-9)
    assert result.chunks == 4 and result.tokens_scored == 4 * 63


def test_fp32_as_its_own_baseline_is_loaded_once(genai_qwen_fp32, small_qa, monkeypatch):
    def second_load(*_args):
        raise AssertionError("the baseline was loaded a second time")

    monkeypatch.setattr(quality, "_load_baseline", second_load)
    result = quality.evaluate(genai_qwen_fp32, qa_path=small_qa, baseline_dir=genai_qwen_fp32, config=FEW_CHUNKS)
    assert result.kl_div == 0.0 and result.top1_agreement == 1.0


def test_a_self_comparison_runs_one_forward_pass_per_chunk_and_equals_two_separate_loads(genai_qwen_fp32,
                                                                                          monkeypatch):
    model = GenaiModel(genai_qwen_fp32)
    ids = [int(t) for t in model.tokenizer.encode(quality.read_eval_text(quality._default_paths(None, None)[0]))]
    chunks = quality.text_chunks(ids, 64, 3, "eval text")
    separate = quality.score_text(model.model, chunks, GenaiModel(genai_qwen_fp32).model)
    passes = []
    real = quality.chunk_logits
    monkeypatch.setattr(quality, "chunk_logits", lambda m, c: passes.append(m) or real(m, c))
    shared = quality.score_text(model.model, chunks, model.model)
    assert len(passes) == len(chunks)
    assert (shared.kl_div, shared.top1_agreement, shared.perplexity) == \
        (separate.kl_div, separate.top1_agreement, separate.perplexity)
    assert shared.baseline_perplexity == shared.perplexity


def test_int4_differs_from_fp32_and_every_quality_metric_is_logged(int4_vs_fp32):
    got = int4_vs_fp32.metrics()
    assert set(got) == set(metrics.QUALITY_METRICS)
    assert got[metrics.KL_DIV] > 0
    assert 0 < got[metrics.TOP1_AGREEMENT] <= 1
    assert math.isfinite(got[metrics.PERPLEXITY]) and got[metrics.PERPLEXITY] > 1
    assert got[metrics.PPL_DELTA_PCT] == pytest.approx(
        100 * (int4_vs_fp32.perplexity - int4_vs_fp32.baseline_perplexity) / int4_vs_fp32.baseline_perplexity)
    assert 0 <= got[metrics.QA_ACCURACY] <= 1 and 0 <= got[metrics.FORMAT_VALID_RATE] <= 1


def test_bundled_qa_file_is_answered_row_by_row(int4_vs_fp32):
    bundled = quality.load_qa(quality._default_paths(None, None)[1])
    assert len(int4_vs_fp32.qa_rows) == len(bundled) >= 10
    # Every rule but tool_call: the bundled file serves any model, and most models call no tool.
    assert {r["match"] for r in int4_vs_fp32.qa_rows} == set(quality.MATCH_RULES) - {quality.TOOL_CALL_MATCH}
    assert metrics.TOOL_CALL_VALID_RATE not in int4_vs_fp32.metrics()
    assert [r["line"] for r in int4_vs_fp32.qa_rows] == [item.line for item in bundled]


def test_every_edge_case_probe_passes_on_a_fixture_model(int4_vs_fp32):
    rows = {r["probe"]: r for r in int4_vs_fp32.probe_rows}
    assert list(rows) == list(quality.PROBE_NAMES)
    assert all(r["passed"] for r in rows.values()), rows
    assert int4_vs_fp32.edge_cases_passed == int4_vs_fp32.edge_cases_total == 5
    # Too long for the context: a clean, explained refusal rather than a response.
    assert rows["longer_than_context"]["outcome"] == "refusal"
    assert "context" in rows["longer_than_context"]["detail"]
    assert rows["max_new_tokens_0"]["detail"].startswith("0 tokens")


def test_a_probe_that_raises_an_unexpected_exception_fails_as_a_crash(genai_qwen_fp32):
    model = GenaiModel(genai_qwen_fp32)

    def broken_chat(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    model.chat = broken_chat
    row = quality.run_probe(model, "emoji_non_latin")
    assert (row.passed, row.outcome) == (False, "crash")
    assert "UnicodeDecodeError" in row.detail


def test_qa_prompt_is_answered_greedily_through_the_chat_template(genai_qwen_fp32, small_qa):
    result = quality.evaluate(genai_qwen_fp32, qa_path=small_qa, config=FEW_CHUNKS)
    assert result.qa_accuracy == 0.5
    assert [r["correct"] for r in result.qa_rows] == [True, False]
    assert [r["line"] for r in result.qa_rows] == [1, 3]
    direct = GenaiModel(genai_qwen_fp32).chat([{"role": "user", "content": "Name a colour."}], max_new_tokens=4)
    assert result.qa_rows[0]["answer"] == direct["choices"][0]["message"]["content"]
    assert result.baseline_dir is None and metrics.KL_DIV not in result.metrics()


def _item(match: str, expected) -> QaItem:
    return QaItem(line=1, expected=expected, match=match, prompt="q")


@pytest.mark.parametrize("match,expected,answer,correct,valid", [
    ("exact", "42", "  42\n", True, True),
    ("exact", "42", "42.", False, True),
    ("exact", "Paris", "paris", False, True),
    ("exact", "42", "42\nor 43", False, False),
    ("exact", "42", "   ", False, False),
    ("contains", "Paris", "The capital is PARIS.", True, True),
    ("contains", "Paris", "Lyon", False, True),
    ("contains", "Paris", "", False, False),
    ("regex", r"^\d{4}-\d{2}-\d{2}$", "2025-01-01", True, True),
    ("regex", r"^\d{4}-\d{2}-\d{2}$", "January 1st", False, False),
    ("json_keys", ["name", "age"], '{"name": "Ana", "age": 30}', True, True),
    ("json_keys", ["name", "age"], '```json\n{"name": "Ana", "age": 30}\n```', True, True),
    ("json_keys", ["name", "age"], '{"name": "Ana"}', False, False),
    ("json_keys", ["name"], 'Sure! {"name": "Ana"}', False, False),
    ("json_keys", ["name"], '["name"]', False, False),
    ("json_keys", {"product": "Nimbus", "price": 42}, '{"product": "Nimbus", "price": 42}', True, True),
    ("json_keys", {"product": "Nimbus", "price": 42}, '{"product": "Nimbus", "price": 41}', False, True),
])
def test_match_rules_judge_correctness_and_format(match, expected, answer, correct, valid):
    assert judge(_item(match, expected), answer) == (correct, valid)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(name: str, arguments: str) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize("calls,answer,correct,valid", [
    ([_call("get_weather", '{"city": "Oslo"}')], "", True, True),
    ([_call("get_weather", '{"city": "Bergen"}')], "", False, True),  # a valid call with the wrong argument
    ([_call("get_time", '{"city": "Oslo"}')], "", False, False),  # a tool that was never offered
    ([_call("get_weather", '{"town": "Oslo"}')], "", False, False),  # the required parameter is missing
    ([_call("get_weather", "Oslo")], "", False, False),  # arguments that are not a JSON object
    ([], '<tool_call>[{"name": "get_weather"', False, False),  # a call left as text is no call
    ([_call("get_weather", '{"city": "Bergen"}'), _call("get_weather", '{"city": "Oslo"}')], "", True, True),
])
def test_tool_call_rule_judges_the_structured_call_against_the_offered_tools(calls, answer, correct, valid):
    item = QaItem(line=1, expected={"name": "get_weather", "arguments": {"city": "Oslo"}}, match="tool_call",
                  prompt="Weather in Oslo?", tools=[WEATHER_TOOL])
    assert judge(item, answer, calls) == (correct, valid)


def test_a_call_where_words_were_asked_for_is_wrong_and_invalid():
    assert judge(_item("contains", "Oslo"), "", [_call("get_weather", '{"city": "Oslo"}')]) == (False, False)


def test_tool_call_valid_rate_counts_only_tool_call_questions():
    rows = [quality.QaRow(1, "q", "e", "tool_call", "", True, True, "tool_calls"),
            quality.QaRow(2, "q", "e", "tool_call", "", False, False, "stop"),
            quality.QaRow(3, "q", "e", "contains", "x", False, False, "stop")]
    assert quality._tool_call_valid_rate(rows) == 0.5
    assert quality._tool_call_valid_rate(rows[2:]) is None


@pytest.mark.parametrize("lines,needle", [
    (['{"prompt": "a", "expected": "b"}', '{"prompt": "a", "expected": '], "line 2 is not valid JSON"),
    (['{"prompt": "a", "expected": "b"}', "", '["not", "an", "object"]'], "line 3 holds a JSON list"),
    (['{"expected": "b"}'], "line 1 needs exactly one of 'prompt' or 'messages'"),
    (['{"prompt": "a"}'], "line 1 has no 'expected'"),
    (['{"prompt": "a", "expected": "b", "match": "fuzzy"}'], "line 1 has match 'fuzzy'"),
    (['{"prompt": "a", "expected": "(", "match": "regex"}'], "line 1: 'expected' is not a valid regular expression"),
    (['{"prompt": "a", "expected": "name", "match": "json_keys"}'], "line 1: json_keys needs"),
    (['{"messages": [{"role": "user"}], "expected": "b"}'], "line 1: 'messages' must be"),
    (['{"prompt": "a", "expected": "b", "max_new_tokens": 0}'], "line 1: max_new_tokens is 0"),
    (['{"prompt": "a", "expected": {"name": "f"}, "match": "tool_call"}'], "line 1: match tool_call needs 'tools'"),
    (['{"prompt": "a", "expected": "f", "match": "tool_call", "tools": [{"type": "function", "function": '
      '{"name": "f"}}]}'], "line 1: tool_call needs 'expected' as an object"),
    (['{"prompt": "a", "expected": "b", "tools": [{"name": "f"}]}'], "line 1: tools[0] is"),
    (["", "   "], "is empty"),
])
def test_bad_qa_file_is_refused_naming_the_line(tmp_path, lines, needle):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SlmopsError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        quality.load_qa(path)


def test_cli_reports_a_malformed_qa_line_with_its_number(genai_qwen_int4, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "What is 2+2?", "expected": "4"}\n{"prompt": "oops"\n')
    result = slmops("evaluate", "--model-dir", str(genai_qwen_int4), "--qa", str(path), "--no-log", "--quiet")
    assert_one_line_error(result, str(path), "line 2", "not valid JSON")


def test_cli_refuses_an_empty_qa_file(genai_qwen_int4, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    result = slmops("evaluate", "--model-dir", str(genai_qwen_int4), "--qa", str(path), "--no-log", "--quiet")
    assert_one_line_error(result, "empty.jsonl", "is empty", "one JSON object a line")


def test_cli_refuses_a_text_too_short_for_one_chunk(genai_qwen_int4, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short.")
    result = slmops("evaluate", "--model-dir", str(genai_qwen_int4), "--text", str(path), "--no-log", "--quiet")
    assert_one_line_error(result, "short.txt", "fewer than one chunk of 128 tokens")


def test_cli_refuses_missing_input_files(genai_qwen_int4, tmp_path):
    result = slmops("evaluate", "--model-dir", str(genai_qwen_int4), "--text", str(tmp_path / "nope.txt"),
                    "--no-log", "--quiet")
    assert_one_line_error(result, "nope.txt", "does not exist")


def test_baseline_with_another_tokenizer_is_refused(genai_qwen_int4, genai_llama_fp32, small_qa):
    with pytest.raises(SlmopsError, match="tokenizes the text differently"):
        quality.evaluate(genai_qwen_int4, qa_path=small_qa, baseline_dir=genai_llama_fp32, config=FEW_CHUNKS)


def test_cli_prints_writes_json_and_logs_an_mlflow_run_with_tables(genai_qwen_int4, genai_qwen_fp32, small_qa,
                                                                    tracking, tmp_path):
    out = tmp_path / "quality.json"
    result = slmops("evaluate", "--model-dir", str(genai_qwen_int4), "--baseline", str(genai_qwen_fp32),
                    "--qa", str(small_qa), "--chunk-tokens", "64", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "top1_agreement" in result.stdout and "probe longer_than_context: pass" in result.stdout
    data = json.loads(out.read_text())
    assert data["qa_accuracy"] == 0.5 and data["chunk_tokens"] == 64

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("slmops").experiment_id])
    assert set(metrics.QUALITY_METRICS) <= set(run.data.metrics)
    assert run.data.metrics[metrics.KL_DIV] == pytest.approx(data["kl_div"])
    assert run.data.metrics[metrics.EDGE_CASES_PASSED] == 5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"qa_answers.json", "edge_cases.json", "quality.json"} <= artifacts
    table = json.loads(open(client.download_artifacts(run.info.run_id, "qa_answers.json", str(tmp_path))).read())
    assert "answer" in table["columns"] and len(table["data"]) == 2
