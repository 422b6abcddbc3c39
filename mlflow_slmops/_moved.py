"""Import paths of modules that moved into the stage packages: the old path gives the very same module object,
so code written against the flat layout (``from mlflow_slmops import modeldir``, the ``mlflow_slmops.deployment``
entry point of an older install) keeps working, monkeypatching included."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

MOVED = {
    "mlflow_slmops.architectures": "mlflow_slmops.convert.architectures",
    "mlflow_slmops.olive_speedups": "mlflow_slmops.convert.olive.speedups",
    "mlflow_slmops.modeldir": "mlflow_slmops.genai.modeldir",
    "mlflow_slmops.benchmark": "mlflow_slmops.measure.benchmark",
    "mlflow_slmops.quality": "mlflow_slmops.measure.quality",
    "mlflow_slmops.source_ref": "mlflow_slmops.measure.source_ref",
    "mlflow_slmops._worker": "mlflow_slmops.measure.worker",
    "mlflow_slmops.tracking": "mlflow_slmops.track.tracking",
    "mlflow_slmops.report": "mlflow_slmops.track.report",
    "mlflow_slmops.chat": "mlflow_slmops.genai.chat",
    "mlflow_slmops.deployment": "mlflow_slmops.deploy.foundry_local",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path (or a module below it, such as ``mlflow_slmops.deployment.cache``) and loads the new one."""

    def find_spec(self, fullname, path=None, target=None):
        if _new_name(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in MOVED)

    def create_module(self, spec):
        return importlib.import_module(_new_name(spec.name))

    def exec_module(self, module):
        pass  # the module under its new name has run already


def _new_name(fullname: str) -> str | None:
    for old, new in MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        # First: below an old package path, the path finder would otherwise load a second copy of a module.
        sys.meta_path.insert(0, _MovedFinder())
