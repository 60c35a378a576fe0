"""Beam metrics with stable names, in one namespace.

Dataflow shows them in the job UI and `library.progress` turns them into
the progress line; run_summary.json is tallied from the data itself
(`transforms.summary`), so metrics that a runner reports best-effort never
decide the accounting. Names are part of the operator interface
(dashboards, alerts): rename only with a note in docs/operations.md.
"""
from apache_beam.metrics import Metrics

from library.progress import PROGRESS

NAMESPACE = "vision_batch"


def count(name: str, amount: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(amount)
    PROGRESS.add(name, amount)


def record(name: str, value: float) -> None:
    """Add a sample to a distribution (Beam distributions hold integers: pass ms or tokens)."""
    Metrics.distribution(NAMESPACE, name).update(int(value))
