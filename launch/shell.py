"""Print commands the way a user pastes them: quoted, one option per line."""
from __future__ import annotations

import shlex
from typing import Sequence


def command_text(tokens: Sequence[str]) -> str:
    """`tokens` as a shell command; every `--option` starts a continued line."""
    lines: list[list[str]] = [[]]
    for token in tokens:
        if token.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(token))
    return " \\\n    ".join(" ".join(line) for line in lines)
