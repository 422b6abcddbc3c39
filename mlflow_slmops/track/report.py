"""The sweep's own artifacts: the variants table, Pareto plots and report.md.

Pure functions over a pandas DataFrame with one row per variant and the metric keys of metrics.py
as columns, so the same report can be rebuilt from a finished sweep's runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mlflow_slmops import metrics as M

# The two trade-offs the Pareto plots show: (x, y), quality always on y.
QUALITY_AXIS = M.PPL_DELTA_PCT
PARETO_PLOTS = {
    "pareto_size_vs_quality.png": (M.SIZE_MB, QUALITY_AXIS),
    "pareto_speed_vs_quality.png": (M.DECODE_TOK_S, QUALITY_AXIS),
    # Fidelity to the user's own model: KL against the Hugging Face source, on a log axis.
    "pareto_size_vs_source_kl.png": (M.SIZE_MB, M.SRC_KL_MEAN),
    # Quality per byte, comparable across models: bits each source parameter costs against that fidelity.
    "pareto_bits_per_weight_vs_source_kl.png": (M.BITS_PER_WEIGHT, M.SRC_KL_MEAN),
}
# Axes drawn on a log scale: KL spans from float rounding (1e-12) to a broken export (1e-1).
LOG_AXES = {M.SRC_KL_MEAN, M.SRC_KL_MAX, M.SRC_KL_P99, M.SRC_KL_MEDIAN}
# Axes report.md names a winner on, with the sense of "better".
WINNER_AXES = (M.SIZE_MB, M.DECODE_TOK_S, M.TTFT_MS, M.PEAK_RSS_MB, M.KL_DIV, M.SRC_KL_MEAN, M.QA_ACCURACY)
FIGURE_SIZE = (6.4, 4.4)
FIGURE_DPI = 110


def _figure():
    """A matplotlib Figure of the report's size, outside pyplot: no backend is chosen for the host process, no
    global figure list holds it, and it is freed like any object once logged or saved."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    return fig, fig.subplots()


def better(metric: str, a: float, b: float) -> bool:
    """True when a is strictly better than b for this metric."""
    return a > b if metric in M.HIGHER_IS_BETTER else a < b


def pareto_mask(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Non-dominated rows on (x, y), each axis in its own sense of better. NaN rows are never on the front."""
    valid = df[[x, y]].notna().all(axis=1)
    mask = pd.Series(False, index=df.index)
    for i in df.index[valid]:
        xi, yi = df.at[i, x], df.at[i, y]
        dominated = False
        for j in df.index[valid]:
            if i == j:
                continue
            xj, yj = df.at[j, x], df.at[j, y]
            no_worse = not better(x, xi, xj) and not better(y, yi, yj)
            strictly = better(x, xj, xi) or better(y, yj, yi)
            if no_worse and strictly:
                dominated = True
                break
        mask[i] = not dominated
    return mask


def pareto_figure(df: pd.DataFrame, x: str, y: str, title: str):
    """A scatter of variants on (x, y) with the non-dominated ones marked and joined."""
    fig, ax = _figure()
    data = df.dropna(subset=[x, y])
    front = pareto_mask(data, x, y) if len(data) else pd.Series(dtype=bool)
    ax.scatter(data.loc[~front, x], data.loc[~front, y], color="#999999", label="dominated", zorder=2)
    ax.scatter(data.loc[front, x], data.loc[front, y], color="#d62728", s=60, label="Pareto front", zorder=3)
    line = data.loc[front].sort_values(x)
    ax.plot(line[x], line[y], color="#d62728", alpha=0.5, zorder=1)
    for _, row in data.iterrows():
        ax.annotate(str(row["variant"]), (row[x], row[y]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"{x} ({'higher' if x in M.HIGHER_IS_BETTER else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if y in M.HIGHER_IS_BETTER else 'lower'} is better)")
    ax.set_title(title)
    for axis, setter in ((x, ax.set_xscale), (y, ax.set_yscale)):
        if axis in LOG_AXES and len(data) and (data[axis] > 0).all():
            setter("log")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def kl_histogram_figure(histogram: dict, title: str):
    """Per-position KL(P_source || P_variant) counts over log-spaced bins (``quality.kl_histogram``)."""
    edges, counts = histogram["edges"], histogram["counts"]
    fig, ax = _figure()
    ax.stairs(counts, edges, fill=True, color="#1f77b4", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("KL(P_source || P_variant) per position, nats (first bin: at or below it)")
    ax.set_ylabel("positions")
    ax.set_title(title)
    ax.axvline(M.EXPORT_MAX_SRC_KL, color="#d62728", linestyle="--", label=f"export tolerance {M.EXPORT_MAX_SRC_KL:g}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def export_mismatch(df: pd.DataFrame, baseline: str = "fp32") -> str | None:
    """Why the baseline's export differs from its source beyond the export tolerance, or None if it does not."""
    rows = df[(df["variant"] == baseline) & (df.get("status") == "ok")] if "variant" in df else df.iloc[0:0]
    if not len(rows) or M.SRC_KL_MAX not in rows or pd.isna(rows.iloc[0][M.SRC_KL_MAX]):
        return None
    kl, top1 = float(rows.iloc[0][M.SRC_KL_MAX]), float(rows.iloc[0][M.SRC_TOP1_AGREEMENT])
    reasons = []
    if kl > M.EXPORT_MAX_SRC_KL:
        reasons.append(f"{M.SRC_KL_MAX} {kl:.3g} > {M.EXPORT_MAX_SRC_KL:g}")
    if top1 < M.EXPORT_MIN_SRC_TOP1:
        reasons.append(f"{M.SRC_TOP1_AGREEMENT} {top1:.3g} < {M.EXPORT_MIN_SRC_TOP1:g}")
    return "; ".join(reasons) or None


def latency_curve_figure(curves: dict[str, dict[int, float]]):
    """Latency against prompt length, one line per variant."""
    fig, ax = _figure()
    for name, curve in curves.items():
        if curve:
            lens = sorted(int(k) for k in curve)
            ax.plot(lens, [curve[k] if k in curve else curve[str(k)] for k in lens], marker="o", label=name)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"{M.LATENCY_BY_PROMPT_LEN_MS}")
    ax.set_title("Full-response latency by prompt length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def winners(df: pd.DataFrame) -> dict[str, tuple[str, float]]:
    """The best variant on each axis that has values: {metric: (variant, value)}."""
    out = {}
    for metric in WINNER_AXES:
        if metric not in df or df[metric].notna().sum() == 0:
            continue
        col = df[metric].dropna()
        idx = col.idxmax() if metric in M.HIGHER_IS_BETTER else col.idxmin()
        out[metric] = (str(df.at[idx, "variant"]), float(col[idx]))
    return out


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(df: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def report_markdown(df: pd.DataFrame, sweep_run_id: str | None = None) -> str:
    """report.md: which variant wins on each axis, the Pareto sets, and the whole table."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    measured = ok[ok.get("build_only", pd.Series(False, index=ok.index)).fillna(False).astype(bool) == False]  # noqa: E712
    lines = ["# Sweep report", ""]
    if sweep_run_id:
        lines += [f"Sweep run: `{sweep_run_id}`", ""]
    mismatch = export_mismatch(df)
    if mismatch:
        lines += ["## Export mismatch", "",
                  f"The fp32 export differs from the Hugging Face source model ({mismatch}). Every variant is built "
                  "from that export and inherits the error; `slmops promote` refuses this sweep unless given "
                  "`--allow-export-mismatch`. See docs/troubleshooting.md.", ""]
    lines += ["## Winners", "", "| axis | better | variant | value |", "|---|---|---|---|"]
    for metric, (variant, value) in winners(measured).items():
        sense = "higher" if metric in M.HIGHER_IS_BETTER else "lower"
        lines.append(f"| {metric} | {sense} | **{variant}** | {value:.4g} |")
    lines += ["", "## Pareto fronts", ""]
    for fname, (x, y) in PARETO_PLOTS.items():
        if x not in measured or y not in measured:  # a table from before that metric existed
            continue
        front = measured.loc[pareto_mask(measured, x, y), "variant"].tolist() if len(measured) else []
        lines.append(f"- {x} vs {y}: {', '.join(front) or 'none'} (`{fname}`)")
    failed = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    if len(failed):
        lines += ["", "## Failed variants", ""]
        lines += [f"- {r['variant']}: {r.get('error', '')}" for _, r in failed.iterrows()]
    build_only = ok[ok.get("build_only", pd.Series(False, index=ok.index)).fillna(False).astype(bool)]
    if len(build_only):
        lines += ["", "## Build-only variants (not measured on this machine)", ""]
        lines += [f"- {v}" for v in build_only["variant"]]
    lines += ["", "## All variants", "", markdown_table(df, ["variant", "status", *M.VARIANT_METRICS, *M.OPTIONAL_METRICS])]
    return "\n".join(lines) + "\n"


def write_report(df: pd.DataFrame, out_dir: str | Path, sweep_run_id: str | None = None) -> dict[str, Path]:
    """Write variants.csv, the Pareto PNGs and report.md into out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"variants.csv": out_dir / "variants.csv", "report.md": out_dir / "report.md"}
    df.to_csv(paths["variants.csv"], index=False)
    measured = df[(df.get("status") == "ok")] if "status" in df else df
    for fname, (x, y) in PARETO_PLOTS.items():
        if x in measured and y in measured:
            fig = pareto_figure(measured, x, y, f"{x} vs {y}")
            fig.savefig(out_dir / fname)
            paths[fname] = out_dir / fname
    paths["report.md"].write_text(report_markdown(df, sweep_run_id))
    return paths
