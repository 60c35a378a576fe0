"""The docs are true when followed: every command in README.md and docs/*.md runs as shown (docs/docs-check.md)."""
from __future__ import annotations

import pathlib
import re

import pytest

from scripts import check_docs

pytestmark = pytest.mark.engine  # every test here starts the vLLM engine (the fast tier skips them)

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = check_docs.doc_files(REPO)


@pytest.mark.parametrize("path", DOC_FILES, ids=str)
def test_every_command_runs_as_shown(path, private_model_cache):
    outcomes = check_docs.run_file(path, REPO)
    failed = [o for o in outcomes if o.status in ("failed", "lint")]
    assert not failed, "\n" + check_docs.report(failed)


def test_the_check_refuses_untrue_commands(tmp_path):
    """The lint catches what made the docs false before: placeholders, missing reasons, unchecked fences."""
    (tmp_path / "README.md").write_text(
        "```bash not-run:\nls\n```\n"
        "```bash not-run: needs Google Cloud\npython -m launch.submit --output gs://BUCKET/out --project P --region R\n```\n"
        "```bash not-run: needs Google Cloud\n.venv/bin/python -m pipelines.vision_batch --input 'a/*' --output o --dry-run\n```\n"
        "```sh\nls\n```\n"
        "```bash\nexit 3\n```\n"
    )
    found = check_docs.blocks(pathlib.Path("README.md"), tmp_path)
    problems = [check_docs.lint(block) for block in found]
    assert "not-run without a reason" in problems[0][0]
    assert any("gs://BUCKET" in p for p in problems[1]) and any("--project P" in p for p in problems[1])
    assert any("--region R" in p for p in problems[1])
    assert any("unknown option --dry-run" in p for p in problems[2])
    assert "write commands as ```bash" in problems[3][0]
    assert problems[4] == [] and found[4].runs


def test_the_layout_list_names_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n```\n", layout.index("```") + 3)]
    sections = {match.group(1): match.start() for match in re.finditer(r"^([a-z_/]+)/\s", layout, re.MULTILINE)}
    missing = []
    for folder in ("schemas", "library", "engine", "tasks", "transforms", "configuration", "tiny_model", "pipelines",
                   "evaluation", "reporting", "launch", "benchmarks", "scripts"):
        start = sections[folder]
        end = min([s for s in sections.values() if s > start] + [len(layout)])
        text = layout[start:end]
        names = {p.stem for p in (REPO / folder).glob("*.py") if p.stem != "__init__"}
        names |= {p.name for p in (REPO / folder).glob("*.sh")}
        missing += [f"{folder}/{name}" for name in sorted(names) if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert missing == []
