"""The quiet log reads the same on every CPU: each filtered line checked against vLLM's own source.

A log test on one machine sees only that machine's lines (an AVX-512 box never prints the oneDNN
fallback an AVX2 box does). So the filter is tested against the lines themselves: each filtered
vLLM line must still be written, in those words, by the installed vLLM, and must be dropped.
"""
from __future__ import annotations

import importlib.util
import logging
import pathlib

import pytest

from engine.logs import HARMLESS, _DropHarmless

VLLM = pathlib.Path(importlib.util.find_spec("vllm").origin).parent
FROM_VLLM = [harmless for harmless in HARMLESS if harmless.source]


def record(message: str, level: int = logging.WARNING, name: str = "vllm.model_executor.layers.utils") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


@pytest.mark.parametrize("harmless", FROM_VLLM, ids=[h.fragment[:40] for h in FROM_VLLM])
def test_each_filtered_vllm_line_is_still_vllms_own_and_is_dropped(harmless):
    source = (VLLM / harmless.source).read_text()
    assert harmless.fragment in source, f"vLLM no longer writes {harmless.fragment!r} in {harmless.source}"
    assert not _DropHarmless().filter(record(f"prefix {harmless.fragment} suffix"))


@pytest.mark.parametrize("message", [
    # As vLLM 0.32 formats them on an AVX2-only CPU and on a VM with odd NUMA numbering.
    "Failed to create oneDNN linear, fallback to torch linear. Exception: could not create a primitive descriptor "
    "for the matmul primitive. Run workload with environment variable ONEDNN_VERBOSE=all to get additional "
    "diagnostic information.",
    "Node 1 is not in available memory nodes [0].",
    "CPU group key 1 is not a valid memory node. Falling back to memory node 0.",
])
def test_processor_specific_start_up_lines_are_dropped(message):
    assert not _DropHarmless().filter(record(message))


def test_errors_and_unknown_warnings_always_pass():
    drop = _DropHarmless()
    assert drop.filter(record("Failed to create oneDNN linear, fallback to torch linear.", level=logging.ERROR))
    assert drop.filter(record("something nobody has seen before"))
