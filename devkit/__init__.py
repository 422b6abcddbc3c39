"""The repository's own kit, not part of the mlflow-slmops wheel: small local models, the trained demo model, the
demo walkthrough and test helpers. `make demo`, the tests and the benchmarks use it from a clone.

Run the demo with ``python -m devkit.walkthrough`` from the repository root (``make demo`` does).
"""
