"""Every user-facing error message in mlflow_slmops/, read from the source: the text troubleshooting.md must hold.

A message is the first argument of ``SlmopsError(...)`` (or of the deployment's subclass, or of the variants
module's ``_bad`` helper), rendered as written: literal text as is, each ``{expression}`` of an f-string kept
as ``{expression}``. Hints that are module constants are resolved to their text.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlflow_slmops"
ERROR_CALLS = {"SlmopsError", "FoundryLocalDeploymentError"}


# Placeholders are kept between these two characters while rendering, so literal braces (JSON in a hint)
# are never mistaken for them.
OPEN, CLOSE = "\x00", "\x01"
_PLACEHOLDER = re.compile(f"{OPEN}.*?{CLOSE}", re.S)


@dataclass(frozen=True)
class ErrorSite:
    module: str
    line: int
    template: str  # placeholders between OPEN and CLOSE
    hint_template: str | None

    @property
    def message(self) -> str:
        return self.template.replace(OPEN, "{").replace(CLOSE, "}")

    @property
    def hint(self) -> str | None:
        return self.hint_template.replace(OPEN, "{").replace(CLOSE, "}") if self.hint_template else None

    @staticmethod
    def fragments(template: str | None) -> list[str]:
        """The literal pieces of a template, in order: what any rendering of it must contain."""
        return [f.strip() for f in _PLACEHOLDER.split(template or "") if f.strip()]


def _render(node: ast.AST, constants: dict[str, str]) -> str | None:
    """The text of a string expression, placeholders kept as {source}; None if it is not built from literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                parts.append(OPEN + ast.unparse(value.value) + CLOSE)
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _render(node.left, constants), _render(node.right, constants)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return None


def _constants(tree: ast.Module) -> dict[str, str]:
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            text = _render(node.value, found)
            if text is not None:
                found[node.targets[0].id] = text
    return found


def error_sites() -> list[ErrorSite]:
    """Every SlmopsError raised with a literal message, in module and line order."""
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _constants(tree)
        module = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name not in ERROR_CALLS:
                continue
            message = _render(node.args[0], constants)
            if message is None:  # a message passed on from elsewhere (exc.detail): listed where it is made
                continue
            hint_node = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "hint"), None)
            hint = _render(hint_node, constants) if hint_node is not None else None
            sites.append(ErrorSite(module, node.lineno, " ".join(message.split()), hint and " ".join(hint.split())))
    return sorted(sites, key=lambda s: (s.module, s.line))
