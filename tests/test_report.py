"""The sweep report: Pareto fronts, winners, and the files a user opens."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mlflow_slmops.track import report

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


def _with_source(fp32_kl_max: float, fp32_top1: float) -> pd.DataFrame:
    src = {"fp32": (1e-14, fp32_kl_max, fp32_top1), "int8": (1e-4, 1e-3, 0.99), "int4": (1e-2, 0.2, 0.9),
           "int4-bad": (5e-2, 0.9, 0.8)}
    rows = [{**r, **({"src_kl_mean": src[r["variant"]][0], "src_kl_max": src[r["variant"]][1],
                      "src_top1_agreement": src[r["variant"]][2]} if r["variant"] in src else {})} for r in ROWS]
    return pd.DataFrame(rows)


def test_report_plots_quality_against_the_source_and_flags_a_wrong_export(tmp_path):
    paths = report.write_report(_with_source(0.3, 0.76), tmp_path, "run123")
    png = paths["pareto_size_vs_source_kl.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report.md"].read_text()
    assert "## Export mismatch" in md and "src_kl_max 0.3 > 0.0001" in md and "src_top1_agreement 0.76 < 0.99" in md
    assert "- size_mb vs src_kl_mean: fp32, int8, int4 (`pareto_size_vs_source_kl.png`)" in md


def test_a_faithful_export_is_not_flagged():
    assert report.export_mismatch(_with_source(3e-15, 1.0)) is None
    assert report.export_mismatch(_with_source(3e-15, 0.95)) == "src_top1_agreement 0.95 < 0.99"
    assert report.export_mismatch(pd.DataFrame(ROWS)) is None  # no source check: nothing to judge


def test_kl_histogram_figure_draws_the_per_position_counts(tmp_path):
    from mlflow_slmops.measure.quality import kl_histogram

    hist = kl_histogram([0.0, 1e-13, 1e-6, 1e-6, 2e-3, 5.0, 1e3])
    assert sum(hist["counts"]) == 7
    assert hist["counts"][0] == 2  # an exact match and float noise share the first bin
    assert hist["counts"][-1] == 1  # values past the last edge are counted in the last bin
    fig = report.kl_histogram_figure(hist, "int4")
    fig.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drawing_the_report_leaves_the_host_process_matplotlib_alone(tmp_path):
    import subprocess
    import sys

    probe = ("import matplotlib; matplotlib.use('svg'); import pandas as pd; from mlflow_slmops import report; "
             "from tests.test_report import ROWS; import matplotlib.pyplot as plt; "
             f"report.write_report(pd.DataFrame(ROWS), {str(tmp_path)!r}); "
             "print(matplotlib.get_backend(), len(plt.get_fignums()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.split() == ["svg", "0"]  # the host's backend, and no figure left in pyplot's list
