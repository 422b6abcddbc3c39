"""A host application that imports the library keeps its process as it was: signals, environment, logging, gc."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

_HOST = """
import gc, json, logging, os, signal, sys
from pathlib import Path

def on_sigint(signum, frame):
    pass

signal.signal(signal.SIGINT, on_sigint)
handler = logging.StreamHandler(sys.stderr)
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.WARNING)
env_before = dict(os.environ)

from mlflow_slmops import convert
from mlflow_slmops.variants import resolve_variants

results = convert.convert_variants(sys.argv[1], resolve_variants("fp32,int4"), sys.argv[2], cache_dir=sys.argv[3],
                                   progress=False)
changed = sorted(k for k in set(env_before) | set(os.environ) if env_before.get(k) != os.environ.get(k))
print(json.dumps({
    "statuses": [r.status for r in results],
    "sigint_is_ours": signal.getsignal(signal.SIGINT) is on_sigint,
    "root_handlers_are_ours": logging.getLogger().handlers == [handler],
    "root_level": logging.getLogger().level,
    "env_changed": changed,
    "frozen": gc.get_freeze_count(),
    "stdout_is_ours": sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__,
}))
"""


def test_a_host_keeps_its_signal_handlers_environment_logging_and_gc_through_a_conversion(hf_qwen, tmp_path):
    # An empty cache, so Olive really runs its workflows inside the host.
    out = subprocess.run([sys.executable, "-c", _HOST, str(hf_qwen), str(tmp_path / "out"), str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["statuses"] == ["ok", "ok"]
    assert state["sigint_is_ours"] and state["root_handlers_are_ours"] and state["root_level"] == 30
    assert state["env_changed"] == []
    assert state["frozen"] == 0
    assert state["stdout_is_ours"]


_BARE_HOST = """
import json, logging, sys
from mlflow_slmops import convert
from mlflow_slmops.variants import resolve_variants

results = convert.convert_variants(sys.argv[1], resolve_variants("fp32"), sys.argv[2], cache_dir=sys.argv[3],
                                   progress=False)
root = logging.getLogger()
print(json.dumps({"statuses": [r.status for r in results], "root_handlers": len(root.handlers),
                  "root_level": root.level}))
"""


def test_a_host_that_configured_no_logging_gets_no_root_handler_from_a_conversion(hf_qwen, tmp_path):
    # onnxruntime's quantizer calls logging.basicConfig(level=INFO) as it is imported; with no root handler of
    # the host's own in place, that would add one and print every later INFO line of every library.
    out = subprocess.run([sys.executable, "-c", _BARE_HOST, str(hf_qwen), str(tmp_path / "out"), str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state == {"statuses": ["ok"], "root_handlers": 0, "root_level": 30}
    assert "[INFO]" not in out.stderr
