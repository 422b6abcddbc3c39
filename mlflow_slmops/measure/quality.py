"""Quality of one genai model folder: perplexity, KL divergence and top-1 agreement against a baseline,
QA accuracy, answer-format validity and edge-case probes. Runs in a fresh subprocess per variant.

Perplexity uses fixed-size chunks and the full-sequence logits that onnxruntime-genai returns from
``generator.get_output("logits")`` after one ``append_tokens(chunk)``: one forward pass per chunk, never
token by token. KL divergence and top-1 agreement (the llama.cpp method) stream the baseline: both
models are loaded and compared chunk by chunk, so no logits are stored. With a source reference
(``mlflow_slmops.source_ref``: the user's Hugging Face model run in PyTorch), every variant is also
scored against the source model's logits, read back one memory-mapped chunk at a time: the ``src_*``
figures. ``docs/metrics.md`` defines every figure.

Example:
    >>> from mlflow_slmops.measure.quality import run_evaluate                       # doctest: +SKIP
    >>> result = run_evaluate("out/int4", baseline_dir="out/fp32")
    >>> result.metrics()["kl_div"], result.metrics()["qa_accuracy"]
    (0.012, 0.5)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlflow_slmops import data as packaged_data
from mlflow_slmops import metrics
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import chat, modeldir
from mlflow_slmops.measure import worker
from mlflow_slmops.measure.worker import ProgressFn

WORKER_MODULE = "mlflow_slmops.measure.quality"
DEFAULT_CHUNK_TOKENS = 128
DEFAULT_QA_MAX_NEW_TOKENS = 32
# Probes only need to show the model answers or refuses cleanly: a few tokens are enough.
PROBE_MAX_NEW_TOKENS = 8
# A chunk of n tokens gives n - 1 next-token predictions to score.
MIN_CHUNK_TOKENS = 2
MATCH_RULES = ("exact", "contains", "regex", "json_keys", "tool_call")
TOOL_CALL_MATCH = "tool_call"
DEFAULT_MATCH = "contains"
# A chat model often wraps JSON in a markdown fence; the format check accepts that and nothing else.
_JSON_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)
PERCENT = 100.0
# slmops.role of a run logged by `slmops evaluate` on its own.


# ---------------------------------------------------------------- records


@dataclass
class QualityConfig:
    """How to evaluate.

    Args:
        chunk_tokens: tokens per perplexity chunk (capped by the model's context length).
        max_chunks: score at most this many chunks of the text (None: all whole chunks).
        qa_max_new_tokens: new-token limit for a QA answer, unless its line sets ``max_new_tokens``.
    """

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    max_chunks: int | None = None
    qa_max_new_tokens: int = DEFAULT_QA_MAX_NEW_TOKENS

    def validate(self) -> None:
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < MIN_CHUNK_TOKENS:
            raise SlmopsError(f"chunk_tokens is {self.chunk_tokens!r}, expected an integer >= {MIN_CHUNK_TOKENS}",
                              f"pass a chunk size of at least {MIN_CHUNK_TOKENS} tokens")
        if self.max_chunks is not None and (not isinstance(self.max_chunks, int) or self.max_chunks < 1):
            raise SlmopsError(f"max_chunks is {self.max_chunks!r}, expected a positive integer", "pass 1 or more")
        if not isinstance(self.qa_max_new_tokens, int) or self.qa_max_new_tokens < 1:
            raise SlmopsError(f"qa_max_new_tokens is {self.qa_max_new_tokens!r}, expected a positive integer",
                              "pass 1 or more")

    @classmethod
    def from_dict(cls, data: dict) -> "QualityConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class QaItem:
    """One validated line of a QA file."""

    line: int
    expected: Any
    match: str
    prompt: str | None = None
    messages: list[dict] | None = None
    max_new_tokens: int | None = None
    # OpenAI function tools handed to the chat template with the question (``chat.check_tools``).
    tools: list[dict] | None = None

    def question(self) -> str:
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages or [] if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]

    def chat_messages(self) -> list[dict]:
        """A bare prompt is sent as a single user message, through the model's chat template."""
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]


@dataclass
class QaRow:
    """One answered question, as logged with ``mlflow.log_table``."""

    line: int
    question: str
    expected: str
    match: str
    answer: str
    correct: bool
    format_valid: bool
    finish_reason: str
    error: str = ""
    # The structured calls the model answered with, as JSON (OpenAI ``tool_calls``), or "".
    tool_calls: str = ""


@dataclass
class ProbeRow:
    """One edge-case probe: passed if the model answered or refused cleanly."""

    probe: str
    passed: bool
    outcome: str  # "response", "refusal" or "crash"
    detail: str


@dataclass
class TextScores:
    """Perplexity (and, with a baseline, KL and top-1 agreement) over the same chunks."""

    perplexity: float
    chunks: int
    chunk_tokens: int
    tokens_scored: int
    baseline_perplexity: float | None = None
    kl_div: float | None = None
    top1_agreement: float | None = None
    source: "SourceScores | None" = None


# KL histogram bins: log-spaced edges in nats, from KL_HIST_MIN to KL_HIST_MAX, KL_HIST_BINS_PER_DECADE a decade.
# Positions below the first edge (an exact match, or rounding noise) are counted in the first bin.
KL_HIST_MIN_EXP = -12
KL_HIST_MAX_EXP = 2
KL_HIST_BINS_PER_DECADE = 4
P99 = 99.0


@dataclass
class SourceScores:
    """A variant against the source model (the Hugging Face model in PyTorch) over the same chunks.

    KL is KL(P_source || P_variant) per position, in nats; ``delta_p_mean`` is the mean |p_variant - p_source|
    of the source's most likely token; ``histogram`` holds the per-position KL counts over log-spaced bins.
    """

    perplexity: float
    source_perplexity: float
    ppl_delta_pct: float
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    delta_p_mean: float
    positions: int
    histogram: dict = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {metrics.SRC_KL_MEAN: self.kl_mean, metrics.SRC_KL_MEDIAN: self.kl_median,
                metrics.SRC_KL_P99: self.kl_p99, metrics.SRC_KL_MAX: self.kl_max,
                metrics.SRC_TOP1_AGREEMENT: self.top1_agreement, metrics.SRC_DELTA_P_MEAN: self.delta_p_mean,
                metrics.SRC_PPL_DELTA_PCT: self.ppl_delta_pct, metrics.SRC_PERPLEXITY: self.source_perplexity}


def kl_histogram(kl: Any) -> dict:
    """Counts of per-position KL values over fixed log-spaced bins (values below the first edge go in bin 0)."""
    import numpy as np

    edges = np.logspace(KL_HIST_MIN_EXP, KL_HIST_MAX_EXP,
                        (KL_HIST_MAX_EXP - KL_HIST_MIN_EXP) * KL_HIST_BINS_PER_DECADE + 1)
    clipped = np.clip(np.asarray(kl, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


class _SourceTally:
    """Per-position figures against the source, gathered chunk by chunk; the logits themselves are not kept."""

    def __init__(self) -> None:
        self.kl: list[Any] = []
        self.agree = self.positions = 0
        self.nll = self.source_nll = self.delta_p = 0.0

    def add(self, got: dict) -> None:
        import numpy as np

        self.kl.append(np.maximum(got["kl"], 0.0))  # float rounding can give -1e-9 for identical rows
        self.agree += int(got["agree"].sum())
        self.positions += len(got["kl"])
        self.nll -= float(got["logp"].sum(dtype=np.float64))
        self.source_nll -= float(got["base_logp"].sum(dtype=np.float64))
        self.delta_p += float(np.abs(np.exp(got["logp_at_base_top"]) - np.exp(got["base_logp_at_base_top"]))
                              .sum(dtype=np.float64))

    def scores(self, predictions: int) -> SourceScores:
        import numpy as np

        kl = np.concatenate(self.kl).astype(np.float64)
        ppl, src_ppl = math.exp(self.nll / predictions), math.exp(self.source_nll / predictions)
        return SourceScores(
            perplexity=ppl, source_perplexity=src_ppl, ppl_delta_pct=PERCENT * (ppl - src_ppl) / src_ppl,
            kl_mean=float(kl.mean()), kl_median=float(np.median(kl)), kl_p99=float(np.percentile(kl, P99)),
            kl_max=float(kl.max()), top1_agreement=self.agree / self.positions,
            delta_p_mean=self.delta_p / self.positions, positions=self.positions, histogram=kl_histogram(kl))


@dataclass
class QualityResult:
    """Every quality figure of one model folder. ``metrics()`` gives the MLflow metric dict."""

    model_dir: str
    baseline_dir: str | None
    text_path: str
    qa_path: str
    perplexity: float
    baseline_perplexity: float | None
    ppl_delta_pct: float | None
    kl_div: float | None
    top1_agreement: float | None
    qa_accuracy: float
    format_valid_rate: float
    edge_cases_passed: int
    edge_cases_total: int
    chunks: int
    chunk_tokens: int
    tokens_scored: int
    # Valid structured calls ÷ tool_call questions; None when the QA file asks for no tool call.
    tool_call_valid_rate: float | None = None
    # Against the source model (None when the source check was skipped): SourceScores as a dict.
    source: dict | None = None
    source_ref: str | None = None
    # Rows for mlflow.log_table: one dict per question (QaRow fields) and per probe (ProbeRow fields).
    qa_rows: list[dict] = field(default_factory=list)
    probe_rows: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Metrics keyed by ``mlflow_slmops.metrics`` names; the baseline ones only when a baseline was given."""
        out = {
            metrics.PERPLEXITY: self.perplexity,
            metrics.QA_ACCURACY: self.qa_accuracy,
            metrics.FORMAT_VALID_RATE: self.format_valid_rate,
            metrics.EDGE_CASES_PASSED: float(self.edge_cases_passed),
        }
        if self.tool_call_valid_rate is not None:
            out[metrics.TOOL_CALL_VALID_RATE] = self.tool_call_valid_rate
        if self.baseline_dir is not None:
            out[metrics.PPL_DELTA_PCT] = self.ppl_delta_pct
            out[metrics.KL_DIV] = self.kl_div
            out[metrics.TOP1_AGREEMENT] = self.top1_agreement
        if self.source is not None:
            out.update(SourceScores(**self.source).metrics())
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QualityResult":
        return cls(**data)

    def with_probes(self, rows: list[ProbeRow]) -> "QualityResult":
        self.probe_rows = [asdict(r) for r in rows]
        self.edge_cases_passed = sum(r.passed for r in rows)
        self.edge_cases_total = len(rows)
        return self


# ---------------------------------------------------------------- QA file


def load_qa(path: str | Path) -> list[QaItem]:
    """Read and validate a QA JSONL file. Errors name the file and the 1-based line number.

    Each non-blank line is an object with ``prompt`` (a string) or ``messages`` (a chat list),
    ``expected``, an optional ``match`` (``exact``, ``contains`` (default), ``regex``, ``json_keys``,
    ``tool_call``), an optional ``max_new_tokens`` and optional ``tools`` (OpenAI function tools). For
    ``json_keys``, ``expected`` is a list of required keys, or an object whose keys are required and whose values
    must be equal. For ``tool_call``, ``tools`` is required and ``expected`` is ``{"name": ..., "arguments": {...}}``.

    Example:
        >>> load_qa("qa.jsonl")[0].match          # doctest: +SKIP
        'contains'
    """
    path = Path(path)
    text = _read_text_file(path, "QA file", 'add one JSON object a line: {"prompt": "...", "expected": "..."}')
    return [_parse_qa_line(path, n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse_qa_line(path: Path, n: int, line: str) -> QaItem:
    where = f"QA file {path} line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SlmopsError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno})",
                          "write one JSON object per line")
    if not isinstance(obj, dict):
        raise SlmopsError(f"{where} holds a JSON {type(obj).__name__}, expected an object",
                          'write {"prompt": "...", "expected": "..."}')
    if ("prompt" in obj) == ("messages" in obj):
        raise SlmopsError(f"{where} needs exactly one of 'prompt' or 'messages'", "give the question one way")
    if "expected" not in obj:
        raise SlmopsError(f"{where} has no 'expected'", "add the expected answer")
    match = obj.get("match", DEFAULT_MATCH)
    if match not in MATCH_RULES:
        raise SlmopsError(f"{where} has match {match!r}, expected one of {', '.join(MATCH_RULES)}",
                          "use a supported match rule")
    item = QaItem(line=n, expected=_check_expected(where, match, obj["expected"]), match=match,
                  max_new_tokens=_check_max_new_tokens(where, obj.get("max_new_tokens")),
                  tools=_check_tools(where, match, obj.get("tools")))
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise SlmopsError(f"{where} has an empty or non-string 'prompt'", "write the question as a string")
        item.prompt = obj["prompt"]
    else:
        item.messages = _check_messages(where, obj["messages"])
    return item


def _check_tools(where: str, match: str, tools: Any) -> list[dict] | None:
    try:
        tools = chat.check_tools(tools)
    except SlmopsError as exc:
        raise SlmopsError(f"{where}: {exc.message}", chat.TOOLS_HINT) from None
    if match == TOOL_CALL_MATCH and tools is None:
        raise SlmopsError(f"{where}: match tool_call needs 'tools', the functions the model may call", chat.TOOLS_HINT)
    return tools


def _check_expected(where: str, match: str, expected: Any) -> Any:
    if match == TOOL_CALL_MATCH:
        ok = (isinstance(expected, dict) and isinstance(expected.get("name"), str) and expected["name"]
              and isinstance(expected.get("arguments", {}), dict) and set(expected) <= {"name", "arguments"})
        if not ok:
            raise SlmopsError(f"{where}: tool_call needs 'expected' as an object with a 'name' and optional "
                              f"'arguments' object, found {expected!r}",
                              'write "expected": {"name": "get_weather", "arguments": {"city": "Oslo"}}')
        return expected
    if match == "json_keys":
        ok_list = isinstance(expected, list) and expected and all(isinstance(k, str) and k for k in expected)
        if not (ok_list or (isinstance(expected, dict) and expected)):
            raise SlmopsError(f"{where}: json_keys needs 'expected' as a non-empty list of key names "
                              f"or a non-empty object, found {expected!r}", 'write "expected": ["name", "age"]')
        return expected
    if isinstance(expected, bool) or not isinstance(expected, (str, int, float)) or str(expected).strip() == "":
        raise SlmopsError(f"{where}: match {match} needs a non-empty string 'expected', found {expected!r}",
                          "write the expected answer as a string")
    if match == "regex":
        try:
            re.compile(str(expected))
        except re.error as exc:
            raise SlmopsError(f"{where}: 'expected' is not a valid regular expression ({exc})", "fix the pattern")
    return str(expected)


def _check_max_new_tokens(where: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlmopsError(f"{where}: max_new_tokens is {value!r}, expected a positive integer", "fix or remove it")
    return value


def _check_messages(where: str, messages: Any) -> list[dict]:
    """The chat-form question, checked as every chat input is (``chat.check_messages``), the error naming the line."""
    try:
        return chat.check_messages(messages)
    except SlmopsError:
        raise SlmopsError(f"{where}: 'messages' must be a non-empty list of objects with string 'role' and 'content'",
                          'write "messages": [{"role": "user", "content": "..."}]') from None


# ---------------------------------------------------------------- matching


def judge(item: QaItem, answer: str, tool_calls: list[dict] | None = None) -> tuple[bool, bool]:
    """(correct, format_valid) of an answer (and the structured calls it made) under the item's match rule.
    See docs/metrics.md.

    Example:
        >>> judge(QaItem(line=1, expected=["a"], match="json_keys", prompt="q"), '{"a": 1}')
        (True, True)
    """
    if item.match == TOOL_CALL_MATCH:
        return _judge_call(item, tool_calls or [])
    if tool_calls:  # a call where words were asked for
        return False, False
    text = answer.strip()
    if item.match == "exact":
        return text == item.expected.strip(), bool(text) and "\n" not in text
    if item.match == "contains":
        return item.expected.casefold() in text.casefold(), bool(text)
    if item.match == "regex":
        found = re.search(item.expected, answer) is not None
        return found, found
    obj = parse_json_object(text)
    keys = list(item.expected)
    valid = obj is not None and all(k in obj for k in keys)
    if isinstance(item.expected, dict):
        return valid and all(obj[k] == v for k, v in item.expected.items()), valid
    return valid, valid


def _judge_call(item: QaItem, calls: list[dict]) -> tuple[bool, bool]:
    """Valid: at least one call, every call names a listed tool and its arguments are a JSON object holding the
    tool's required parameters. Correct: valid, and one call has the expected name and (if given) arguments."""
    required = {t["function"]["name"]: set((t["function"].get("parameters") or {}).get("required") or ())
                for t in item.tools or []}
    parsed = []
    for call in calls:
        name, args = call["function"]["name"], parse_json_object(call["function"]["arguments"])
        if name not in required or args is None or not required[name] <= set(args):
            return False, False
        parsed.append((name, args))
    valid = bool(parsed)
    want_args = item.expected.get("arguments")
    correct = valid and any(name == item.expected["name"] and (want_args is None or args == want_args)
                            for name, args in parsed)
    return correct, valid


def parse_json_object(text: str) -> dict | None:
    """The answer as a JSON object (optionally inside a markdown code fence), or None."""
    text = text.strip()
    fenced = _JSON_FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# ---------------------------------------------------------------- text scoring


def read_eval_text(path: str | Path) -> str:
    return _read_text_file(Path(path), "text file", "pass a plain-text file of a few thousand words")


def _read_text_file(path: Path, what: str, empty_hint: str) -> str:
    if not path.exists():
        raise SlmopsError(f"{what} {path} does not exist", "pass an existing file")
    if not path.is_file():
        raise SlmopsError(f"{what} {path} is a folder, expected a file", "pass a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SlmopsError(f"{what} {path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8")
    if not text.strip():
        raise SlmopsError(f"{what} {path} is empty", empty_hint)
    return text


def text_chunks(ids: list[int], chunk_len: int, max_chunks: int | None, text_path: str | Path) -> list[list[int]]:
    """Consecutive, non-overlapping chunks of exactly chunk_len tokens; the tail is dropped."""
    count = len(ids) // chunk_len
    if count == 0:
        raise SlmopsError(
            f"text file {text_path} has {len(ids)} tokens, fewer than one chunk of {chunk_len} tokens",
            f"use a longer text (at least {chunk_len} tokens) or a smaller chunk size",
        )
    if max_chunks is not None:
        count = min(count, max_chunks)
    return [ids[i * chunk_len:(i + 1) * chunk_len] for i in range(count)]


def chunk_logits(model: Any, ids: list[int]) -> Any:
    """Logits for every position of one chunk, (len(ids), vocab) float32: one forward pass.

    onnxruntime-genai 0.14 returns logits for all appended positions from ``get_output("logits")``
    after the first ``append_tokens`` (checked in tests/test_quality.py).
    """
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    logits = generator.get_output("logits")
    if logits.ndim != 3 or logits.shape[1] != len(ids):
        raise SlmopsError(
            f"the model returned logits of shape {tuple(logits.shape)} for a {len(ids)}-token chunk; "
            "perplexity needs logits for every position",
            "export the model with full-sequence logits (the default of the model builder)",
        )
    return np.asarray(logits[0], dtype=np.float32)


# ONNX opset of the scoring graphs (ReduceSum takes its axes as an input from opset 13 on).
_SCORER_OPSET = 17


class LogitScorer:
    """Turns a chunk's logits into per-position figures with two tiny onnxruntime graphs.

    A row-wise log-softmax over a 150k vocabulary costs about as much as a small model's forward pass in
    single-threaded numpy; onnxruntime's LogSoftmax is vectorised and multi-threaded.

    ``own(x, t)`` gives log p(t_i) for each row i of the logits x (L, V) and targets t (L,).
    ``compare(x, b, t)`` also gives the baseline's log p_b(t_i), KL(P_b || P) per row, whether both argmaxes
    agree, and both log-probabilities of the baseline's most likely token. ``b`` may be logits or log-probabilities:
    LogSoftmax maps both to the same log-probabilities.
    """

    def __init__(self) -> None:
        self._own = self._session(compare=False)
        self._compare = self._session(compare=True)

    @staticmethod
    def _session(compare: bool) -> Any:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        def logits_input(name: str) -> Any:
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["L", "V"])

        col = ["L", 1]
        # A comparison runs in float64: in float32 the log-softmax of a 150k vocabulary rounds each term by
        # ~1e-6, a KL noise floor far above a faithful export's true KL (~1e-12).
        real = TensorProto.DOUBLE if compare else TensorProto.FLOAT
        nodes = [helper.make_node("Cast", ["x"], ["xr"], to=real),
                 helper.make_node("LogSoftmax", ["xr"], ["lx"], axis=-1),
                 helper.make_node("GatherElements", ["lx", "t"], ["gx"], axis=1)]
        inputs = [logits_input("x"), helper.make_tensor_value_info("t", TensorProto.INT64, col)]
        outputs = [helper.make_tensor_value_info("gx", real, col)]
        if compare:
            nodes += [
                helper.make_node("Cast", ["b"], ["br"], to=real),
                helper.make_node("LogSoftmax", ["br"], ["lb"], axis=-1),
                helper.make_node("GatherElements", ["lb", "t"], ["gb"], axis=1),
                helper.make_node("Sub", ["lb", "lx"], ["diff"]),
                helper.make_node("Exp", ["lb"], ["pb"]),
                helper.make_node("Mul", ["pb", "diff"], ["terms"]),
                helper.make_node("ReduceSum", ["terms", "axes"], ["kl"], keepdims=1),
                helper.make_node("ArgMax", ["x"], ["ax"], axis=-1, keepdims=1),
                helper.make_node("ArgMax", ["b"], ["ab"], axis=-1, keepdims=1),
                helper.make_node("GatherElements", ["lx", "ab"], ["xab"], axis=1),
                helper.make_node("GatherElements", ["lb", "ab"], ["bab"], axis=1),
            ]
            inputs.insert(1, logits_input("b"))
            outputs += [helper.make_tensor_value_info("gb", real, col),
                        helper.make_tensor_value_info("kl", real, col),
                        helper.make_tensor_value_info("ax", TensorProto.INT64, col),
                        helper.make_tensor_value_info("ab", TensorProto.INT64, col),
                        helper.make_tensor_value_info("xab", real, col),
                        helper.make_tensor_value_info("bab", real, col)]
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
        graph = helper.make_graph(nodes, "slmops_scorer", inputs, outputs, initializer=[axes] if compare else [])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _SCORER_OPSET)])
        model.ir_version = 8  # readable by every onnxruntime we support
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    @staticmethod
    def _targets(chunk: list[int]) -> Any:
        import numpy as np

        # The last position has no next token in the chunk; it gets a dummy target and is not summed.
        return np.asarray([*chunk[1:], 0], dtype=np.int64).reshape(-1, 1)

    def own(self, logits: Any, chunk: list[int]) -> Any:
        """log p(next token) at each position but the last, shape (L-1,)."""
        (gx,) = self._own.run(None, {"x": logits, "t": self._targets(chunk)})
        return gx[:-1, 0]

    def compare(self, logits: Any, base_logits: Any, chunk: list[int]) -> dict:
        """Per position: log p and log p_base of the next token (L-1,), KL(P_base || P) (L,), top-1 match (L,),
        and log p and log p_base of the baseline's top token (L,)."""
        gx, gb, kl, ax, ab, xab, bab = self._compare.run(
            None, {"x": logits, "b": base_logits, "t": self._targets(chunk)})
        return {"logp": gx[:-1, 0], "base_logp": gb[:-1, 0], "kl": kl[:, 0], "agree": ax[:, 0] == ab[:, 0],
                "logp_at_base_top": xab[:, 0], "base_logp_at_base_top": bab[:, 0]}


@functools.lru_cache(maxsize=1)
def _shared_scorer() -> LogitScorer:
    """One scorer per process: its first run allocates onnxruntime's buffers, later runs reuse them."""
    return LogitScorer()


def score_text(model: Any, chunks: list[list[int]], baseline: Any = None,
               on_chunk: Callable[[int, int], None] | None = None, source: Any = None) -> TextScores:
    """Perplexity of model over chunks; with a baseline model, also mean KL(P_base || P_model) and top-1 agreement;
    with a source reference, the ``src_*`` figures against the source model's logits.

    Each chunk is one forward pass of the model, compared with the baseline's pass and the source's stored
    logits of the same chunk before the next chunk starts, so at most one chunk per model is in memory.

    Args:
        model: an ``onnxruntime_genai.Model``.
        chunks: token id chunks from ``text_chunks`` (the source reference's chunks when a source is given).
        baseline: the baseline ``onnxruntime_genai.Model`` (same tokenizer), or None; ``model`` itself for a
            self-comparison, which reuses each chunk's one forward pass.
        on_chunk: called with (chunks done, chunks total).
        source: a ``source_ref.SourceReference`` built over the same chunks, or None.
    """
    import numpy as np

    scorer = _shared_scorer()
    nll = base_nll = kl_sum = 0.0
    agree = predictions = positions = 0
    tally = _SourceTally() if source is not None else None
    for i, chunk in enumerate(chunks):
        logits = chunk_logits(model, chunk)
        predictions += len(chunk) - 1
        if tally is not None:
            got = scorer.compare(logits, _same_vocab(source.logits(i), logits, "source model's"), chunk)
            tally.add(got)
        if baseline is None:
            nll -= float((got["logp"] if tally is not None else scorer.own(logits, chunk)).sum(dtype=np.float64))
        else:
            # The fp32 variant is its own baseline: its one forward pass serves both sides.
            base_logits = logits if baseline is model else chunk_logits(baseline, chunk)
            got = scorer.compare(logits, _same_vocab(base_logits, logits, "baseline's"), chunk)
            nll -= float(got["logp"].sum(dtype=np.float64))
            base_nll -= float(got["base_logp"].sum(dtype=np.float64))
            kl_sum += float(got["kl"].sum(dtype=np.float64))
            agree += int(got["agree"].sum())
            positions += len(chunk)
        if on_chunk:
            on_chunk(i + 1, len(chunks))
    scores = TextScores(perplexity=math.exp(nll / predictions), chunks=len(chunks), chunk_tokens=len(chunks[0]),
                        tokens_scored=predictions, source=tally.scores(predictions) if tally else None)
    if baseline is not None:
        scores.baseline_perplexity = math.exp(base_nll / predictions)
        scores.kl_div = kl_sum / positions
        scores.top1_agreement = agree / positions
    return scores


def _same_vocab(other: Any, logits: Any, whose: str) -> Any:
    import numpy as np

    if other.shape != logits.shape:
        raise SlmopsError(f"the {whose} vocabulary ({other.shape[1]}) differs from the model's ({logits.shape[1]})",
                          "compare variants of the same base model")
    return np.ascontiguousarray(other, dtype=np.float32)


# ---------------------------------------------------------------- QA and probes


def answer_qa(gm: Any, items: list[QaItem], default_max_new_tokens: int,
              on_item: Callable[[int, int], None] | None = None) -> list[QaRow]:
    """Answer each question greedily through the chat template (a bare prompt as one user message)."""
    rows = []
    for i, item in enumerate(items):
        limit = item.max_new_tokens or default_max_new_tokens
        answer, finish, error, calls = "", "error", "", []
        try:
            answer, finish, calls = _ask(gm, item, limit)
        except SlmopsError as exc:  # for example a question longer than the context: a wrong answer
            error = exc.message
        correct, valid = judge(item, answer, calls) if not error else (False, False)
        expected = item.expected if isinstance(item.expected, str) else json.dumps(item.expected)
        shown = json.dumps([c["function"] for c in calls]) if calls else ""
        rows.append(QaRow(line=item.line, question=item.question(), expected=expected, match=item.match,
                          answer=answer, correct=correct, format_valid=valid, finish_reason=finish, error=error,
                          tool_calls=shown))
        if on_item:
            on_item(i + 1, len(items))
    return rows


def _ask(gm: Any, item: QaItem, max_new_tokens: int) -> tuple[str, str, list[dict]]:
    """(text, finish reason, structured tool calls) of one greedy answer."""
    if gm.chat_template is None and item.prompt is not None and item.tools is None:
        gen = gm.generate(item.prompt, max_new_tokens=max_new_tokens, do_sample=False)
        return gen.text, gen.finish_reason, []
    out = gm.chat(item.chat_messages(), tools=item.tools, max_new_tokens=max_new_tokens, do_sample=False)
    choice = out["choices"][0]
    return choice["message"]["content"] or "", choice["finish_reason"], choice["message"].get("tool_calls") or []


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# Text with emoji, combining marks, right-to-left and CJK scripts.
NON_LATIN_TEXT = "🚀✨👍🏽 Привет! 日本語のテキスト، مرحبا بالعالم — Ελληνικά, हिन्दी, ñandú. What is this?"
# Each probe sends one chat request the way a user of the deployed model could.
PROBES: dict[str, Callable[[Any], dict]] = {
    "empty_prompt": lambda gm: gm.chat(_user(""), max_new_tokens=PROBE_MAX_NEW_TOKENS),
    "longer_than_context": lambda gm: gm.chat(_user("word " * (gm.context_length + 16)),
                                              max_new_tokens=PROBE_MAX_NEW_TOKENS),
    "emoji_non_latin": lambda gm: gm.chat(_user(NON_LATIN_TEXT), max_new_tokens=PROBE_MAX_NEW_TOKENS),
    "whitespace_only": lambda gm: gm.chat(_user(" \n\t  \n "), max_new_tokens=PROBE_MAX_NEW_TOKENS),
    "max_new_tokens_0": lambda gm: gm.chat(_user("Say hello."), max_new_tokens=0),
}
PROBE_NAMES = tuple(PROBES)


def run_probe(gm: Any, name: str) -> ProbeRow:
    """Run one probe: a response or an SlmopsError passes; any other exception is a crash."""
    try:
        out = PROBES[name](gm)
    except SlmopsError as exc:
        return ProbeRow(name, True, "refusal", exc.message)
    except Exception as exc:  # the point of the probe: anything else is a crash
        return ProbeRow(name, False, "crash", f"{type(exc).__name__}: {exc}")
    content = out["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        return ProbeRow(name, False, "crash", f"response content is {type(content).__name__}, not text")
    return ProbeRow(name, True, "response", f"{out['usage']['completion_tokens']} tokens: {content[:80]!r}")


# ---------------------------------------------------------------- evaluate


def evaluate(model_dir: str | Path, text_path: str | Path | None = None, qa_path: str | Path | None = None,
             baseline_dir: str | Path | None = None, config: QualityConfig | None = None,
             on_progress: ProgressFn | None = None, probes: tuple[str, ...] = PROBE_NAMES,
             on_probe: Callable[[str, ProbeRow | None], None] | None = None,
             source_ref: str | Path | None = None) -> QualityResult:
    """Evaluate one genai folder in this process (``run_evaluate`` runs this in a fresh subprocess).

    Args:
        model_dir: the genai folder to evaluate.
        text_path: plain text for perplexity; the packaged ``eval_text.txt`` if None.
        qa_path: QA JSONL; the packaged ``qa.jsonl`` if None.
        baseline_dir: the fp32 genai folder to compare against (KL, top-1, ppl delta), or None.
        config: chunking and generation limits; ``QualityConfig()`` if None.
        on_progress: called with (task, completed, total).
        probes: which edge-case probes to run (all by default).
        on_probe: called with (name, None) before a probe and (name, row) after it.
        source_ref: a source reference folder (``source_ref.build_reference``) over the same text and chunking:
            adds the ``src_*`` figures against the Hugging Face source model.

    Example:
        >>> evaluate("out/int4", baseline_dir="out/fp32").top1_agreement     # doctest: +SKIP
    """
    from mlflow_slmops.genai.runtime import GenaiModel

    config = config or QualityConfig()
    config.validate()
    text_path, qa_path = _default_paths(text_path, qa_path)
    text, items = read_eval_text(text_path), load_qa(qa_path)
    gm = GenaiModel(model_dir)
    ids = [int(t) for t in gm.tokenizer.encode(text)]
    chunks = text_chunks(ids, min(config.chunk_tokens, gm.context_length), config.max_chunks, text_path)
    source = _open_source(source_ref, chunks, model_dir) if source_ref is not None else None
    # Probes first: if one kills the process, run_evaluate restarts without it and loses nothing else.
    probe_rows = _run_probes(gm, probes, on_progress, on_probe)
    if baseline_dir is not None and Path(baseline_dir).resolve() == Path(model_dir).resolve():
        base_model = gm.model  # fp32 against itself: loaded once, not twice (a 3B fp32 model is 12 GB)
    else:
        base_model = _load_baseline(baseline_dir, text, ids) if baseline_dir is not None else None
    scores = score_text(gm.model, chunks, base_model, _task(on_progress, "perplexity chunks"), source)
    del base_model  # free the baseline before generating answers
    qa_rows = answer_qa(gm, items, config.qa_max_new_tokens, _task(on_progress, "QA questions"))
    result = _result(model_dir, baseline_dir, text_path, qa_path, scores, qa_rows, probe_rows)
    if scores.source is not None:
        result.source, result.source_ref = asdict(scores.source), str(source_ref)
    return result


def source_reference_for(model_dir: str | Path, text_path: str | Path | None, config: QualityConfig,
                         cache_dir: str | Path | None = None, on_progress: ProgressFn | None = None,
                         trust_remote_code: bool = False) -> Any:
    """The source reference of a Hugging Face model over the text, chunked as ``config`` scores it (built once).

    Example:
        >>> ref = source_reference_for("./my-finetuned-model", None, QualityConfig())     # doctest: +SKIP
        >>> run_evaluate("out/int4", source_ref=ref.path).metrics()["src_kl_mean"]        # doctest: +SKIP
    """
    from mlflow_slmops import convert
    from mlflow_slmops.measure import source_ref

    config.validate()
    convert.check_hf_model_dir(model_dir, trust_remote_code=trust_remote_code)
    text_path, _ = _default_paths(text_path, None)
    ref_config = source_ref.ReferenceConfig(config.chunk_tokens, config.max_chunks, trust_remote_code)
    return source_ref.build_reference(model_dir, text_path, ref_config, cache_dir=cache_dir, on_progress=on_progress)


def _open_source(source_ref: str | Path, chunks: list[list[int]], model_dir: str | Path) -> Any:
    """The source reference, checked to hold exactly the chunks this variant's own tokenizer makes of the text."""
    from mlflow_slmops.measure.source_ref import SourceReference

    source = SourceReference.open(source_ref)
    if source.chunks != chunks:
        ours, theirs = [t for c in chunks for t in c], [t for c in source.chunks for t in c]
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise SlmopsError(
            f"{model_dir} cuts the evaluation text into other tokens than the source model's tokenizer "
            f"({len(chunks)} chunks of {len(chunks[0])} against {len(source.chunks)} of {len(source.chunks[0])}; "
            f"first difference at token {at})",
            "re-export the tokenizer with the model, or pass --no-source-check to skip the source comparison")
    return source


def _default_paths(text_path: str | Path | None, qa_path: str | Path | None) -> tuple[Path, Path]:
    return (Path(text_path) if text_path is not None else packaged_data.path(packaged_data.EVAL_TEXT),
            Path(qa_path) if qa_path is not None else packaged_data.path(packaged_data.QA_FILE))


def _task(on_progress: ProgressFn | None, task: str) -> Callable[[int, int], None] | None:
    return (lambda done, total: on_progress(task, done, total)) if on_progress else None


def _run_probes(gm: Any, probes: tuple[str, ...], on_progress: ProgressFn | None,
                on_probe: Callable[[str, ProbeRow | None], None] | None) -> list[ProbeRow]:
    rows = []
    for i, name in enumerate(probes):
        if on_probe:
            on_probe(name, None)
        row = run_probe(gm, name)
        rows.append(row)
        if on_probe:
            on_probe(name, row)
        if on_progress:
            on_progress("edge-case probes", i + 1, len(probes))
    return rows


def _load_baseline(baseline_dir: str | Path, text: str, ids: list[int]) -> Any:
    from mlflow_slmops.genai.runtime import GenaiModel

    base = GenaiModel(baseline_dir)
    if [int(t) for t in base.tokenizer.encode(text)] != ids:
        raise SlmopsError(f"baseline {baseline_dir} tokenizes the text differently from the evaluated model",
                          "compare variants converted from the same Hugging Face model")
    return base.model


def _result(model_dir: str | Path, baseline_dir: str | Path | None, text_path: Path, qa_path: Path,
            scores: TextScores, qa_rows: list[QaRow], probe_rows: list[ProbeRow]) -> QualityResult:
    delta = None
    if scores.baseline_perplexity is not None:
        delta = PERCENT * (scores.perplexity - scores.baseline_perplexity) / scores.baseline_perplexity
    return QualityResult(
        model_dir=str(model_dir), baseline_dir=str(baseline_dir) if baseline_dir is not None else None,
        text_path=str(text_path), qa_path=str(qa_path), perplexity=scores.perplexity,
        baseline_perplexity=scores.baseline_perplexity, ppl_delta_pct=delta, kl_div=scores.kl_div,
        top1_agreement=scores.top1_agreement,
        qa_accuracy=sum(r.correct for r in qa_rows) / len(qa_rows),
        format_valid_rate=sum(r.format_valid for r in qa_rows) / len(qa_rows),
        tool_call_valid_rate=_tool_call_valid_rate(qa_rows),
        edge_cases_passed=sum(r.passed for r in probe_rows), edge_cases_total=len(probe_rows),
        chunks=scores.chunks, chunk_tokens=scores.chunk_tokens, tokens_scored=scores.tokens_scored,
        qa_rows=[asdict(r) for r in qa_rows], probe_rows=[asdict(r) for r in probe_rows],
    )


def _tool_call_valid_rate(qa_rows: list[QaRow]) -> float | None:
    calls = [r for r in qa_rows if r.match == TOOL_CALL_MATCH]
    return sum(r.format_valid for r in calls) / len(calls) if calls else None


def run_evaluate(model_dir: str | Path, text_path: str | Path | None = None, qa_path: str | Path | None = None,
                 baseline_dir: str | Path | None = None, config: QualityConfig | None = None,
                 on_progress: ProgressFn | None = None, timeout_s: float | None = None,
                 source_ref: str | Path | None = None) -> QualityResult:
    """Evaluate one genai folder in a fresh subprocess. A probe that kills the process fails that probe only.

    Args: as ``evaluate``; timeout_s kills a worker after that many seconds (None: no limit).

    Raises:
        SlmopsError: missing or bad inputs (QA errors name the line), a text too short for one chunk,
            or a worker that failed outside the probes (with its last error line).

    Example:
        >>> run_evaluate("out/int4", baseline_dir="out/fp32").metrics()       # doctest: +SKIP
    """
    config = config or QualityConfig()
    config.validate()
    text_path, qa_path = _default_paths(text_path, qa_path)
    read_eval_text(text_path)
    load_qa(qa_path)  # bad input fails here, before any model loads
    for folder in (model_dir, baseline_dir):
        if folder is not None:
            modeldir.check_genai_dir(folder)
    base_args = ["--model-dir", str(model_dir), "--text", str(text_path), "--qa", str(qa_path),
                 "--config", json.dumps(asdict(config))]
    if baseline_dir is not None:
        base_args += ["--baseline", str(baseline_dir)]
    if source_ref is not None:
        base_args += ["--source-ref", str(source_ref)]
    return _run_with_probe_restarts(base_args, on_progress, timeout_s, str(model_dir))


def _run_with_probe_restarts(base_args: list[str], on_progress: ProgressFn | None, timeout_s: float | None,
                             what: str) -> QualityResult:
    """Run the worker; if it dies inside a probe, record that probe as a crash and run it again without it."""
    done: dict[str, ProbeRow] = {}
    while True:
        state: dict[str, str | None] = {"running": None}
        remaining = [p for p in PROBE_NAMES if p not in done]

        def on_event(event: dict, state=state) -> None:
            worker.progress_events(on_progress)(event)
            if event.get("event") == "probe_start":
                state["running"] = event["probe"]
            elif event.get("event") == "probe_done":
                done[event["row"]["probe"]] = ProbeRow(**event["row"])
                state["running"] = None

        outcome = worker.run_worker(WORKER_MODULE, [*base_args, "--probes", ",".join(remaining)],
                                     on_event=on_event, timeout_s=timeout_s)
        crashed = state["running"]
        if outcome.result is None and crashed is not None:
            done[crashed] = ProbeRow(crashed, False, "crash",
                                     f"the process died (exit code {outcome.returncode}): {outcome.last_error_line()}")
            continue
        result = QualityResult.from_dict(worker.raise_for_outcome(outcome, f"quality evaluation of {what}"))
        return result.with_probes([done[p] for p in PROBE_NAMES if p in done])


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=WORKER_MODULE, description="internal: quality worker")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--qa", required=True)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--source-ref", default=None)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--probes", default=",".join(PROBE_NAMES))
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    probes = tuple(p for p in args.probes.split(",") if p)

    def on_probe(name: str, row: ProbeRow | None) -> None:
        if row is None:
            worker.emit("probe_start", probe=name)
        else:
            worker.emit("probe_done", row=asdict(row))

    def run() -> dict:
        return evaluate(args.model_dir, args.text, args.qa, args.baseline,
                        QualityConfig.from_dict(json.loads(args.config)), worker.emit_progress,
                        probes, on_probe, args.source_ref).to_dict()

    return worker.run_guarded(run, args.json)


if __name__ == "__main__":
    sys.exit(_worker_main())
