"""Every `slmops` and `mlflow` command in the README and docs/ parses: its command and option names exist.

The flows themselves run elsewhere (test_demo runs `slmops-demo`, test_remote_tracking sweep -> promote -> deploy,
test_deployment every `mlflow deployments` verb, test_fanout the scaling example). This test catches the drift
those cannot: a renamed option or command that a page still shows. Each command is parsed by its real click CLI
with `--help` appended: click rejects unknown commands and options while parsing, before `--help` is acted on.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.S)
COMMAND = re.compile(r"^(?:\$ )?(?:\.venv/bin/)?(slmops|mlflow) (.*)$")
# Shell syntax around a documented command, and placeholders a reader fills in.
PLACEHOLDER = re.compile(r"<[^>]+>|\$\([^)]*\)|\$\{?\w+\}?")


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in SHELL_BLOCK.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                match = COMMAND.match(line.strip())
                if match:
                    found.append((f"{page.name}: {line.strip()[:70]}", line.strip()))
    return found


def argv_of(line: str) -> tuple[str, list[str]]:
    line = PLACEHOLDER.sub("X", line)
    line = re.split(r"\s(?:#|>|2>|&|\|)", line + " ", maxsplit=1)[0]  # comments, redirects, pipes, background
    tokens = shlex.split(line)
    prog = tokens[0].rsplit("/", 1)[-1]
    return prog, tokens[1:]


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_both_clis():
    progs = {argv_of(line)[0] for _, line in COMMANDS}
    assert progs == {"slmops", "mlflow"} and len(COMMANDS) >= 25, COMMANDS


@pytest.mark.parametrize("line", [line for _, line in COMMANDS], ids=[name for name, _ in COMMANDS])
def test_documented_command_parses_with_the_real_cli(line):
    from mlflow.cli import cli as mlflow_cli

    from mlflow_slmops.cli import main as slmops_cli

    prog, args = argv_of(line)
    result = CliRunner().invoke(slmops_cli if prog == "slmops" else mlflow_cli, [*args, "--help"])
    assert result.exit_code == 0, f"{line}\n{result.output}"
    assert "Usage:" in result.output
