"""One resolver from options to the job's configuration, and one table of environment variables."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from configuration import options
from configuration.options import JobConfig
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


def test_importing_the_options_patches_nothing_and_the_worker_plugin_installs_the_gcs_budget():
    """library/ sits below configuration/: the GCS budget is read from the options' flags, installed on purpose."""
    script = """
import sys
from apache_beam.io.gcp import gcsio_retry
from apache_beam.options.pipeline_options import PipelineOptions
from library import storage
assert not [name for name in sys.modules if name.startswith("configuration")]
options = PipelineOptions(["--gcs_retry_timeout_s=7", "--gcs_retry_max_delay_s", "3", "--runner=DataflowRunner"])
assert storage.RetryBudget.from_options(options) == storage.RetryBudget(7.0, 1.0, 3.0)  # no options class declares them here
import configuration.options
assert gcsio_retry.get_retry is not storage.beam_retry
import library.gcs_retry_plugin  # what every worker imports: --beam_plugins
assert gcsio_retry.get_retry is storage.beam_retry
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   timeout=120)


def test_the_launcher_plans_the_engine_its_workers_resolve():
    """launch/job.py and the job's own resolution are one construction: same argv, same engine settings and tasks."""
    from launch.job import profile_pipeline_args
    from launch.profiles import PROFILES
    from tests.launch_support import DEPLOYMENT, MODEL, USER_ARGS

    extra = ["--task_vision_tokens=ocr=140", "--engine_arg=max_num_seqs=128", "--max_in_flight=64", "--thinking=on"]
    args, planned = profile_pipeline_args(PROFILES["tpu-v6e-8"], DEPLOYMENT, [*USER_ARGS, *extra])
    config = JobConfig.from_options(PipelineOptions(args), MODEL, MODEL, False)  # what the Dataflow launcher VM resolves
    assert planned.xla_cache_path is None and config.engine.xla_cache_path  # decided by the launch, read by the workers
    assert dataclasses.replace(config.engine, xla_cache_path=None) == planned.settings(MODEL)
    assert config.tasks == planned.tasks
    assert {task.name: task.vision_tokens for task in config.tasks} == {"ocr": 140, "caption": 280, "detect": 280}


def test_the_command_line_checks_once_and_reads_the_task_file_once(tmp_path, monkeypatch, tiny_checkpoint):
    from pipelines import vision_batch

    task_file = tmp_path / "tasks.yaml"
    task_file.write_text("tasks:\n  - name: colour\n    instruction: Name the main colour.\n    output: text\n")
    opened, checked, resolved = [], [], []
    real_open, real_check = FileSystems.open, options.check_values
    monkeypatch.setattr(FileSystems, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    monkeypatch.setattr(options, "check_values", lambda o: checked.append(o) or real_check(o))

    class Resolved(Exception):
        pass

    def stop(pipeline, config):  # everything before the graph has run: checks, model, configuration, output claim
        resolved.append(config)
        raise Resolved

    monkeypatch.setattr(vision_batch, "build_pipeline", stop)
    with pytest.raises(Resolved):
        vision_batch.run(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--task_file", str(task_file),
                          "--tasks", "colour,caption", "--model", str(tiny_checkpoint)])
    assert opened.count(str(task_file)) == 1 and len(checked) == 1
    assert [task.name for task in resolved[0].tasks] == ["colour", "caption"]
