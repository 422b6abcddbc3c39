"""Run every benchmark in `benchmarks/`, one after another, each in its own process (`make bench`).

They must not overlap: each measures speed or memory on the same cores. Results land in
`benchmarks/out/*.{json,md}`; docs/benchmarks.md quotes them with the machine details.

Run:  .venv/bin/python benchmarks/run_all.py [--only convert,fidelity]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In order: the 0.5B-shaped model first (conversion and fidelity use it), the quick ones last.
BENCHMARKS = {
    "qwen05-shape": ["make_qwen05_shape.py"],
    "convert": ["bench_convert.py"],
    "fidelity": ["bench_fidelity.py", "--rounds", "2", "--repeats", "4"],
    "deploy": ["bench_deploy.py"],
    "load": ["bench_load.py"],
    "promote": ["bench_promote_many.py"],
    "demo-model": ["bench_demo_model.py"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    names = [n for n in parser.parse_args().only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in names:
        script, *args = BENCHMARKS[name]
        print(f"== {name}: {script} {' '.join(args)}", flush=True)
        start = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / script), *args])
        print(f"== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
