"""The MLflow UI, in a real Chromium, shows what a sweep logged to a real `mlflow server`.

One small real sweep (`slmops sweep` as a subprocess against the server) feeds three pages: the
experiment's runs table with the variants nested under the sweep, the compare view with speed and
quality per variant, and the sweep's artifacts with the Pareto plot. Assertions are on what the page
shows. Screenshots go to docs/img/ when SLMOPS_UPDATE_SCREENSHOTS=1, else to a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlflow_slmops import metrics as M
from tests.helpers import slmops
from tests.servers import CHROMIUM, CHROMIUM_ARGS, require_tool

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_DIR = ROOT / "docs" / "img"
UPDATE_SCREENSHOTS_ENV = "SLMOPS_UPDATE_SCREENSHOTS"
VARIANTS = ("fp32", "int8", "int4")
EXPERIMENT = "ui-sweep"
VIEWPORT = {"width": 1400, "height": 900}
COMPARE_VIEWPORT = {"width": 1400, "height": 1000}
# The UI polls the server, so "networkidle" never comes; every wait is for something on the page.
PAGE_TIMEOUT_MS = 90_000
PARETO_PNG = "pareto_speed_vs_quality.png"
# The compare page's metrics table: its row height, and how closely a value must line up with its name.
METRIC_ROW_PX = 45
SCROLL_SETTLE_MS = 200
ROW_ALIGN_PX = 3
# What a user picks once in the sidebar ("Model training") and what closes the assistant panel;
# MLflow keeps both in localStorage, so a fresh browser profile is seeded with them.
UI_PREFERENCES = {
    "mlflow.workflowType_v1": '"machine_learning"',
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
}


@dataclass
class UiSweep:
    url: str
    experiment_id: str
    sweep_run_id: str
    sweep_run_name: str
    variant_run_ids: dict[str, str]


@pytest.fixture(scope="module")
def ui_sweep(mlflow_server, hf_qwen, tmp_path_factory) -> UiSweep:
    """A real sweep of three variants, logged to the server over HTTP by the `slmops sweep` CLI."""
    import mlflow

    work = tmp_path_factory.mktemp("ui-sweep")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
           "SLMOPS_CACHE_DIR": str(work / "cache")}
    result = slmops("sweep", "--model", str(hf_qwen), "--variants", ",".join(VARIANTS), "--output",
                    str(work / "out"), "--prompt-len", "16", "--gen-len", "4", "--repeats", "1", "--quiet",
                    env=env, cwd=str(work), timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    header = re.search(r"Sweep run (\w+) in experiment (\w+)", result.stdout)
    assert header, result.stdout
    sweep_id, exp_id = header.groups()
    # Run IDs only to build the compare URL a user would reach by ticking the rows.
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{sweep_id}'")
    ids = {r.data.tags[M.VARIANT_TAG]: r.info.run_id for r in children}
    assert set(ids) == set(VARIANTS), ids
    return UiSweep(mlflow_server, exp_id, sweep_id, f"sweep-{Path(hf_qwen).name}", ids)


@pytest.fixture(scope="module")
def browser():
    require_tool(Path(CHROMIUM).exists(), f"Chromium ({CHROMIUM}, Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_tool(False, "Python playwright (the dev extra)")
    with sync_playwright() as pw:
        # Debian's Chromium; `playwright install` would download another browser, which is not possible here.
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    seed = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in UI_PREFERENCES.items())
    context.add_init_script(seed)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    pg = context.new_page()
    yield pg
    context.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1":
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        return SCREENSHOT_DIR
    return tmp_path_factory.mktemp("screenshots")


def _open(page, url: str) -> None:
    page.goto(url, wait_until="load")


def _close_assistant(page) -> None:
    """The assistant panel can still open on first load; a user would close it."""
    close = page.locator('button[aria-label="Close"]')
    if close.count() and close.first.is_visible():
        close.first.click()


def test_runs_table_shows_the_variants_nested_under_the_sweep(ui_sweep, page, screenshot_dir):
    _open(page, f"{ui_sweep.url}/#/experiments/{ui_sweep.experiment_id}/runs")
    parent_link = page.get_by_role("link", name=ui_sweep.sweep_run_name, exact=True)
    parent_link.wait_for()
    _close_assistant(page)
    # Collapsed: only the sweep is listed, its variants sit under it.
    for name in VARIANTS:
        assert page.get_by_role("link", name=name, exact=True).count() == 0
    parent_row = page.locator("[role='row']", has=parent_link)
    parent_row.locator("button[data-component-id*='runnamecellrenderer']").click()
    for name in VARIANTS:
        page.get_by_role("link", name=name, exact=True).wait_for()
    # The nested rows are indented past the sweep's name.
    parent_x = parent_link.bounding_box()["x"]
    for name in VARIANTS:
        assert page.get_by_role("link", name=name, exact=True).bounding_box()["x"] > parent_x
    page.screenshot(path=str(screenshot_dir / "ui-runs.png"))


def _run_name_columns(page) -> dict[str, tuple[float, float]]:
    """The horizontal extent of each run's column on the compare page, by the run name heading it."""
    row = page.locator("tr", has=page.get_by_text("Run Name:", exact=True))
    row.wait_for()
    columns = {}
    for cell in row.locator("td").all():
        box = cell.bounding_box()
        columns[cell.inner_text().strip()] = (box["x"], box["x"] + box["width"])
    return columns


def _scroll_metric_into_view(page, header) -> None:
    """Wheel the metrics table (a fixed-height box) until the metric's row shows, as a user would.

    MLflow moves the metric-name column to the value grid's previous position on each scroll event, so a
    last +1/-1 wheel leaves both columns lined up.
    """
    names_grid = page.locator("[role='grid']", has=header)
    names_grid.scroll_into_view_if_needed()  # the page itself, so the mouse can reach the table
    names_box = names_grid.bounding_box()
    values_box = next(b for b in (g.bounding_box() for g in page.locator("[role='grid']").all())
                      if b and abs(b["y"] - names_box["y"]) < 1 and b["x"] > names_box["x"])
    page.mouse.move(values_box["x"] + values_box["width"] / 2, values_box["y"] + values_box["height"] / 2)
    row_y = header.bounding_box()["y"]
    below_by = row_y + METRIC_ROW_PX - (names_box["y"] + names_box["height"])
    above_by = names_box["y"] - row_y
    jump = below_by if below_by > 0 else (-above_by - METRIC_ROW_PX if above_by > 0 else 0)
    for delta in ([jump] if jump else []) + [1, -1]:
        page.mouse.wheel(0, delta)
        page.wait_for_timeout(SCROLL_SETTLE_MS)


def _metric_values(page, metric: str, columns: dict[str, tuple[float, float]]) -> dict[str, str]:
    """The values the metrics table shows on the metric's row, by the run name heading their column."""
    header = page.locator("a[title='Plot chart']", has_text=re.compile(rf"^{re.escape(metric)}$"))
    header.wait_for()
    _scroll_metric_into_view(page, header)
    y = header.bounding_box()["y"]
    # Every rendered cell's text and place in the viewport (as bounding_box gives), in one round trip.
    cells = page.locator("[role='grid'] span").evaluate_all(
        "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return {text: e.innerText, x: r.x + r.width / 2, y: r.y}; })")
    shown: dict[str, str] = {}
    for cell in cells:
        if abs(cell["y"] - y) > ROW_ALIGN_PX:
            continue
        for name, (left, right) in columns.items():
            if left <= cell["x"] <= right:
                shown[name] = cell["text"].strip()
    return shown


def _collapse_section(page, title: str) -> None:
    page.locator("[role='button'][aria-expanded='true']", has_text=re.compile(rf"^{title}$")).first.click()


def _plot_axes(page, params: list[str], metrics: list[str]) -> None:
    """Set the parallel-coordinates plot to these parameter and metric axes through its two pickers."""
    page.get_by_role("button", name="Clear All").click()
    pickers = page.locator(".du-bois-light-select-selector input")
    for picker, keys in zip((pickers.nth(0), pickers.nth(1)), (params, metrics)):
        for key in keys:
            picker.click()
            picker.fill(key)
            page.keyboard.press("Enter")
        page.keyboard.press("Escape")


def test_compare_view_shows_speed_and_quality_for_every_variant(ui_sweep, page, screenshot_dir):
    page.set_viewport_size(COMPARE_VIEWPORT)
    runs = [ui_sweep.variant_run_ids[v] for v in VARIANTS]
    query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([ui_sweep.experiment_id])})
    _open(page, f"{ui_sweep.url}/#/compare-runs?{query}")
    page.get_by_text(f"Comparing {len(VARIANTS)} Runs").wait_for()
    _close_assistant(page)
    columns = _run_name_columns(page)
    assert set(VARIANTS) <= set(columns), columns
    compared = [M.DECODE_TOK_S, M.PPL_DELTA_PCT]

    # The plot: one axis per metric, one line per variant.
    _plot_axes(page, ["variant"], compared)
    plot_text = page.locator(".js-plotly-plot svg text")
    for label in ["variant", *compared, *VARIANTS]:
        plot_text.filter(has_text=re.compile(rf"^{re.escape(label)}$")).first.wait_for()

    # The table: a number for every variant on each metric's row.
    _collapse_section(page, "Parameters")
    for metric in compared:
        shown = _metric_values(page, metric, {v: columns[v] for v in VARIANTS})
        assert set(shown) == set(VARIANTS), f"{metric}: {shown}"
        for variant, text in shown.items():
            assert re.fullmatch(r"-?[0-9.]+(e[+-]?[0-9]+)?", text), f"{metric} of {variant} shows {text!r}"
        if metric == M.DECODE_TOK_S:
            assert all(float(t) > 0 for t in shown.values()), shown
        else:
            # Quality is measured against fp32, so fp32 shows no perplexity change.
            assert float(shown["fp32"]) == 0, shown
    page.get_by_text(f"Comparing {len(VARIANTS)} Runs").scroll_into_view_if_needed()
    page.screenshot(path=str(screenshot_dir / "ui-compare.png"))


def test_sweep_artifacts_show_the_pareto_plot(ui_sweep, page, screenshot_dir):
    _open(page, f"{ui_sweep.url}/#/experiments/{ui_sweep.experiment_id}/runs/{ui_sweep.sweep_run_id}/artifacts")
    for name in ("report.md", "variants.csv", "pareto_size_vs_quality.png", PARETO_PNG):
        page.get_by_text(name, exact=True).first.wait_for()
    _close_assistant(page)
    page.get_by_text(PARETO_PNG, exact=True).first.click()
    image = page.locator(f"img[alt='{PARETO_PNG}']").first
    image.wait_for()
    # The PNG really came over HTTP from the server and decoded: it has pixels.
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 100 and height > 100
    page.screenshot(path=str(screenshot_dir / "ui-pareto.png"))
