"""Measuring a variant: each measurement runs in its own worker process and returns a result record.

    benchmark.py   speed, memory and CPU (BenchmarkResult)
    quality.py     perplexity, KL and top-1 against fp32 and the source, QA, format, edge cases (QualityResult)
    source_ref.py  the user's Hugging Face model run in PyTorch: the source reference quality compares with
    worker.py      the worker-process protocol: progress events, results, a killed or crashed worker

Nothing here imports MLflow: ``track`` logs the results.
"""
