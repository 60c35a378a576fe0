"""Throughput benchmarks: this pipeline against the peers' designs, on the same inputs.

    python -m benchmarks.run [--items N] [--quick]

Writes BENCHMARKS.md (repo root) and benchmarks/results.json. Benchmarks are
measurements, never tests: nothing here asserts a timing.
"""
