"""One resolver from options to the job's configuration, and one table of environment variables."""
from __future__ import annotations

import pathlib
import re
import subprocess

from library import environment

REPO = pathlib.Path(__file__).resolve().parent.parent


def _tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    texts = {}
    for name in names:
        try:
            texts[name] = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary samples, fixtures
    return texts


def test_every_vision_batch_variable_in_the_tree_is_in_the_table_and_read_through_it():
    texts = _tracked_text_files()
    named = {match for text in texts.values() for match in re.findall(r"\bVISION_BATCH_[A-Z0-9_]*[A-Z0-9]\b", text)}
    assert named == {variable.name for variable in environment.VARIABLES}
    # Outside the tests, the names are spelt only in the table: readers call environment.read, writers use .name.
    direct = re.compile(r"""(?:environ\.get|getenv|environ\[)\(?\s*["']VISION_BATCH_""")
    readers = [name for name, text in texts.items()
               if name.endswith(".py") and not name.startswith("tests/") and direct.search(text)]
    assert readers == []


def test_the_readme_lists_every_environment_variable():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Environment variables"):]
    assert [v.name for v in environment.VARIABLES if f"| `{v.name}` |" not in section] == []


def test_an_empty_variable_means_the_default(monkeypatch):
    from engine import host, model_staging

    monkeypatch.setenv(environment.HOST_ENGINE_IDLE_S.name, "")
    monkeypatch.setenv(environment.MODEL_DIR.name, "")
    assert host.idle_grace_s() == 30.0
    assert model_staging.default_root().name == "vision-batch-models"
    monkeypatch.setenv(environment.HOST_ENGINE_IDLE_S.name, "2")
    assert host.idle_grace_s() == 2.0
