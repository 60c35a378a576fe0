"""Beam metrics with stable names, in one namespace.

Dataflow shows them in the job UI; locally `pipelines.summary` reads them
back into run_summary.json. Names are part of the operator interface
(dashboards, alerts): rename only with a note in docs/operations.md.
"""
from apache_beam.metrics import Metrics

from transforms.progress import PROGRESS

NAMESPACE = "vision_batch"


def count(name: str, amount: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(amount)
    PROGRESS.add(name, amount)


def record(name: str, value: float) -> None:
    """Add a sample to a distribution (Beam distributions hold integers: pass ms or tokens)."""
    Metrics.distribution(NAMESPACE, name).update(int(value))
