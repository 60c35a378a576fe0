"""engine/local.py without an engine (fast): in-process engine cores are shut down with the last of them."""
from __future__ import annotations

import types

from engine.local import _InProcessCores


def _engine(shut: list[str], name: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=lambda: shut.append(name)))


def test_an_in_process_core_closed_while_another_runs_is_shut_down_with_the_last():
    """Shutting one down tears down the process's distributed state the other steps with (see _InProcessCores)."""
    cores, shut = _InProcessCores(), []
    close_a = cores.add(_engine(shut, "a"))
    close_b = cores.add(_engine(shut, "b"))
    close_a()
    assert shut == []  # b still runs
    close_b()
    assert shut == ["a", "b"]
    close_c = cores.add(_engine(shut, "c"))  # alone: shut down at once
    close_c()
    assert shut == ["a", "b", "c"]
