"""Output kinds (`tasks.kinds.base.OutputKind`), registered in one table keyed by a task file's `output` value.

Adding a kind is its module and one entry here; `tests/test_kinds.py` checks
every registered kind implements every hook and is accepted by task files.
"""
from __future__ import annotations

from typing import Mapping

from tasks.kinds.base import OutputKind, Row
from tasks.kinds.boxes import BOXES
from tasks.kinds.json import JSON
from tasks.kinds.layout import LAYOUT
from tasks.kinds.text import TEXT

KINDS: Mapping[str, OutputKind] = {kind.name: kind for kind in (TEXT, BOXES, JSON, LAYOUT)}


def kind_of(row: Row) -> OutputKind:
    """The kind of a results row: the one whose column it fills, else text (rows of every kind fill `text`)."""
    return next((kind for kind in KINDS.values() if kind.column and row.get(kind.column) is not None), TEXT)


__all__ = ["BOXES", "JSON", "KINDS", "LAYOUT", "TEXT", "OutputKind", "kind_of"]
