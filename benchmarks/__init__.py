"""Benchmarks: this pipeline against the peers' designs, and incremental runs against a growing history.

    python -m benchmarks.run [--items N] [--quick]            # throughput -> benchmarks/results.json
    python -m benchmarks.tune                                 # engine knobs -> benchmarks/tuning.json
    python -m benchmarks.incremental [--sizes ...]            # history size -> benchmarks/incremental.json

Each writes its JSON and re-renders BENCHMARKS.md (repo root) from all three.
Benchmarks are measurements, never tests: nothing here asserts a timing.
"""
