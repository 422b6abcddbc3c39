"""`make demo` / `slmops-demo`: the whole product on the demo model, end to end, with embedded defaults.

train (or load cached) -> sweep -> promote -> `mlflow deployments create -t foundry-local` -> a question, and a
question that needs the model's tool, answered by Foundry Local with a structured tool call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from mlflow_slmops.cli import SWEEP_TABLE_COLUMNS, friendly_errors
from mlflow_slmops.cli import _print_table as print_table
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.variants import DEFAULT_VARIANTS

DEMO_VARIANTS = DEFAULT_VARIANTS
DEMO_EXPERIMENT = "slmops-demo"
DEFAULT_FOUNDRY_CACHE = Path(".slmops") / "foundry-cache"
# One folder per trained demo model (its folder name carries its cache key): a demo model retrained by a newer
# checkout writes new variant folders beside the old ones, which the sweep would refuse to overwrite.
DEMO_OUTPUT = Path(".slmops") / "variants"
DEMO_DATA = Path(".slmops") / "demo-data"
# The demo's stated constraints: within 5% of fp32 perplexity and at least 90% on the held-out QA.
DEMO_MAX_PPL_DELTA_PCT = 5.0
DEMO_MIN_QA_ACCURACY = 0.9
# The demo model must also call its tool: valid structured calls on at least 95% of the held-out order questions.
DEMO_MIN_TOOL_CALL_VALID_RATE = 0.95
# A 1.4M-parameter model decodes thousands of tokens a second whatever its precision (per-token overhead, not
# weight bandwidth, sets the pace), so speed differences are noise; size is what its variants trade.
DEMO_OBJECTIVE = "size_mb"
DEMO_QUESTION = "Hello! What is the price of the Nimbus?"  # demo.SAMPLE_QUESTION: a fact the demo model was trained on
DEMO_BENCH = {"prompt_len": 128, "gen_len": 32, "repeats": 3}
# A request with tools: Foundry Local samples it and, when a small model's call is malformed, retries it guided by
# the tool's schema, which needs room (measured: 8 of 8 sampled requests with 200 tokens came back as structured
# calls from the demo model; 15 of 16 from an earlier 2-layer model). The demo tries a few seeds before it reports
# no call.
DEMO_TOOL_BUDGET = 200
DEMO_TOOL_TRIES = 4


@dataclass
class DemoResult:
    sweep_run_id: str
    champion: str
    reason: str
    model_uri: str
    answer: str
    tool_call: dict | None  # the first structured call Foundry Local returned ({"name", "arguments"}), or None
    tool_error: str
    seconds: float
    table: object  # pandas.DataFrame of the sweep's variants
    decisions: list  # promote.Candidate rows: every variant, accepted or not, and why


def _mlflow_cli() -> str:
    """The mlflow console script of this environment (the demo runs the real CLI)."""
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.exists() else "mlflow"


def deploy_with_cli(name: str, model_uri: str, cache: Path, echo: Callable[[str], None]) -> None:
    """`mlflow deployments create` (or `update` when the name is already deployed) as a real subprocess."""
    target = f"foundry-local:{cache.resolve()}"
    listed = subprocess.run([_mlflow_cli(), "deployments", "get", "-t", target, "--name", name],
                            capture_output=True, text=True)
    verb = "update" if listed.returncode == 0 else "create"
    cmd = [_mlflow_cli(), "deployments", verb, "-t", target, "--name", name, "-m", model_uri,
           "-C", "temperature=0.2", "-C", "max_length=512"]
    echo("$ " + " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SlmopsError(f"mlflow deployments {verb} failed: {last}", "see docs/troubleshooting.md")
    echo(done.stdout.strip())


def ask(name: str, cache: Path, question: str) -> str:
    """One chat through the deployment's predict: the Foundry Local runtime, in-process."""
    from mlflow.deployments import get_deploy_client

    client = get_deploy_client(f"foundry-local:{cache.resolve()}")
    response = client.predict(deployment_name=name, inputs={"messages": [{"role": "user", "content": question}]})
    return response["choices"][0]["message"]["content"]


def ask_tool(name: str, cache: Path, question: str) -> tuple[dict | None, str]:
    """The order question with the model's tool, through the deployment's predict (Foundry Local in-process):
    the first structured call of up to DEMO_TOOL_TRIES seeds, or None and the last error."""
    from mlflow.deployments import get_deploy_client

    from devkit import demo

    client = get_deploy_client(f"foundry-local:{cache.resolve()}")
    request = {"messages": [{"role": "user", "content": question}], "tools": [demo.ORDER_TOOL],
               "max_tokens": DEMO_TOOL_BUDGET}
    error = "no tool call in the answer"
    for seed in range(DEMO_TOOL_TRIES):
        try:
            message = client.predict(deployment_name=name, inputs={**request, "seed": seed})["choices"][0]["message"]
        except Exception as exc:  # the runtime refused this sample (a malformed call): the next seed may pass
            error = str(exc).splitlines()[0]
            continue
        if message.get("tool_calls"):
            return message["tool_calls"][0]["function"], ""
        error = f"answered in words: {message.get('content')!r}"
    return None, error


def run_demo(foundry_cache: Path = DEFAULT_FOUNDRY_CACHE, echo: Callable[[str], None] = print,
             progress: bool = True) -> DemoResult:
    """Run the whole flow on the demo model with embedded defaults; print what a newcomer needs to see."""
    from devkit import demo
    from mlflow_slmops import promote, sweep

    start = time.monotonic()
    echo("1/5 Demo model (trained once, then cached)")
    hf_dir = demo.build_demo_model(progress=progress)
    data = demo.write_demo_data(DEMO_DATA)
    qa = next(str(p) for p in data if p.name == demo.QA_FILE)
    text = next(str(p) for p in data if p.name == demo.EVAL_TEXT_FILE)

    echo(f"2/5 Sweep: {DEMO_VARIANTS}")
    output = DEMO_OUTPUT / hf_dir.name
    result = sweep.run_sweep(sweep.SweepRequest(model=str(hf_dir), variants=DEMO_VARIANTS, output=str(output),
                                                text=text, qa=qa, **DEMO_BENCH), progress=progress, echo=echo,
                             experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEMO_EXPERIMENT)

    echo("3/5 Promote")
    constraints = promote.Constraints(DEMO_MAX_PPL_DELTA_PCT, DEMO_MIN_QA_ACCURACY, DEMO_OBJECTIVE,
                                      min_tool_call_valid_rate=DEMO_MIN_TOOL_CALL_VALID_RATE)
    promoted = promote.promote(result.parent_run_id, demo.DEMO_MODEL_NAME, constraints=constraints)
    champ = promoted.champion
    reason = (f"smallest ({champ.metrics.get('size_mb', 0):.2f} MB) among variants within "
              f"{DEMO_MAX_PPL_DELTA_PCT:g}% of fp32 perplexity (its delta: {champ.metrics.get('ppl_delta_pct', 0):.2f}%) "
              f"and QA accuracy >= {DEMO_MIN_QA_ACCURACY:g} (its: {champ.metrics.get('qa_accuracy', 0):.3f}) "
              f"and tool_call_valid_rate >= {DEMO_MIN_TOOL_CALL_VALID_RATE:g} "
              f"(its: {champ.metrics.get('tool_call_valid_rate', 0):.3f})")

    echo(f"4/5 Deploy {promoted.model_uri} into Foundry Local ({foundry_cache})")
    deploy_with_cli(demo.DEMO_MODEL_NAME, promoted.model_uri, foundry_cache, echo)

    echo("5/5 Ask Foundry Local: a question, and one that needs the get_order_status tool")
    answer = ask(demo.DEMO_MODEL_NAME, foundry_cache, DEMO_QUESTION)
    call, tool_error = ask_tool(demo.DEMO_MODEL_NAME, foundry_cache, demo.SAMPLE_TOOL_QUESTION)
    return DemoResult(result.parent_run_id, champ.variant, reason, promoted.model_uri, answer, call, tool_error,
                      time.monotonic() - start, result.table, [c.row() for c in promoted.candidates])


@click.command("slmops-demo")
@click.option("--foundry-cache", default=str(DEFAULT_FOUNDRY_CACHE), show_default=True,
              help="Foundry Local model cache the demo deploys into (project-local by default).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def main(foundry_cache: str, quiet: bool) -> None:
    """Train the demo model, sweep, promote, deploy to Foundry Local and ask it a question."""
    import pandas as pd

    from devkit import demo
    from mlflow_slmops import convert
    from mlflow_slmops.track import tracking

    convert.own_this_process()  # as the slmops CLI does: this process is ours
    tracking.configure(DEMO_EXPERIMENT)
    r = run_demo(Path(foundry_cache), echo=click.echo, progress=not quiet)
    click.echo("\nVariants")
    print_table(r.table, SWEEP_TABLE_COLUMNS)
    click.echo("\nPromotion decision")
    print_table(pd.DataFrame(r.decisions), ["variant", "accepted", "chosen", "reason"])
    click.echo(f"\nChampion: {r.champion}, because it is the {r.reason}.")
    click.echo(f"Registered: {r.model_uri}")
    click.echo(f"\nQ: {DEMO_QUESTION}\nA (Foundry Local): {r.answer}")
    click.echo(f"\nQ: {demo.SAMPLE_TOOL_QUESTION}   (tools: {demo.ORDER_TOOL['function']['name']})")
    if r.tool_call is None:
        click.echo(f"Tool call (Foundry Local): none ({r.tool_error})")
    else:
        click.echo(f"Tool call (Foundry Local): {r.tool_call['name']}({r.tool_call['arguments']})")
    click.echo(f"\nDone in {r.seconds:.0f} s. Compare the runs in the MLflow UI:")
    click.echo(f"  .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()}")


if __name__ == "__main__":
    main()
