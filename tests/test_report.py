"""The sweep report: Pareto fronts, winners, and the files a user opens."""

from __future__ import annotations

import pandas as pd

from mlflow_slmops import report

ROWS = [
    {"variant": "fp32", "status": "ok", "size_mb": 100.0, "decode_tok_s": 10.0, "ppl_delta_pct": 0.0, "kl_div": 0.0, "ttft_ms": 50.0},
    {"variant": "int8", "status": "ok", "size_mb": 40.0, "decode_tok_s": 20.0, "ppl_delta_pct": 0.5, "kl_div": 0.01, "ttft_ms": 40.0},
    {"variant": "int4", "status": "ok", "size_mb": 20.0, "decode_tok_s": 30.0, "ppl_delta_pct": 3.0, "kl_div": 0.1, "ttft_ms": 30.0},
    # Dominated by int4 on both size and quality.
    {"variant": "int4-bad", "status": "ok", "size_mb": 25.0, "decode_tok_s": 25.0, "ppl_delta_pct": 9.0, "kl_div": 0.5, "ttft_ms": 35.0},
    {"variant": "int4-hqq", "status": "failed", "error": "boom"},
]


def test_pareto_front_excludes_only_dominated_variants():
    df = pd.DataFrame(ROWS[:4])
    front = df.loc[report.pareto_mask(df, "size_mb", "ppl_delta_pct"), "variant"].tolist()
    assert front == ["fp32", "int8", "int4"]


def test_winners_respect_each_metrics_direction():
    w = report.winners(pd.DataFrame(ROWS[:4]))
    assert w["size_mb"][0] == "int4"
    assert w["decode_tok_s"][0] == "int4"
    assert w["kl_div"][0] == "fp32"


def test_write_report_makes_csv_plots_and_markdown(tmp_path):
    paths = report.write_report(pd.DataFrame(ROWS), tmp_path, "run123")
    assert set(paths) >= {"variants.csv", "report.md", "pareto_size_vs_quality.png", "pareto_speed_vs_quality.png"}
    assert pd.read_csv(paths["variants.csv"])["variant"].tolist() == [r["variant"] for r in ROWS]
    png = paths["pareto_size_vs_quality.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = paths["report.md"].read_text()
    assert "| size_mb | lower | **int4** |" in md
    assert "int4-hqq: boom" in md
    assert "run123" in md
