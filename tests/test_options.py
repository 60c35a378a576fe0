"""Options -> JobConfig, without running anything."""
import os

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import JobConfig, split_commas


def config(*args: str) -> JobConfig:
    return JobConfig.from_options(PipelineOptions(["--output", "out", *args]), "/m", "model", False)


def test_list_options_accept_repeats_and_commas():
    assert split_commas(["ocr=5,caption=6", "detect=7"]) == ("ocr=5", "caption=6", "detect=7")
    assert split_commas(None) == ()
    job = config("--input", "a/*", "--max_tokens", "ocr=5,caption=6", "--incremental_from", "gs://b/x/,gs://b/y")
    assert {t.name: t.max_tokens for t in job.tasks}["caption"] == 6
    assert job.incremental_from == ("gs://b/x", "gs://b/y")


def test_engine_overrides_and_structured_output():
    job = config("--input", "a", "--engine_arg", "max_model_len=512", "--engine_arg", 'limit_mm_per_prompt={"image": 2}',
                 "--structured_output", "off")
    assert job.engine.engine_args["max_model_len"] == 512
    assert job.engine.engine_args["limit_mm_per_prompt"] == {"image": 2}
    assert job.engine.engine_args["block_size"] == 32  # untouched profile value
    assert job.engine.structured_output is False
    assert config("--input", "a").engine.structured_output is True  # cpu-tiny's own choice


def test_profile_environment_reaches_the_engine_and_the_users_value_wins(monkeypatch):
    from transforms.engine import prepare_process

    settings = config("--input", "a").engine
    assert settings.preprocess_on_step_thread is True  # cpu-tiny: the CPU is the accelerator
    capacity = settings.environment["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    prepare_process(settings)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == capacity
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    prepare_process(settings)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"


def test_host_feeders_split_the_profiles_per_host_budgets():
    one, two = config("--input", "a").engine, config("--input", "a", "--host_feeders", "2").engine
    assert (one.host_feeders, two.host_feeders) == (1, 2)
    assert two.max_in_flight == one.max_in_flight // 2
    assert two.engine_args["mm_processor_cache_gb"] == one.engine_args["mm_processor_cache_gb"] / 2
    assert config("--input", "a", "--host_feeders", "2", "--max_in_flight", "10").engine.max_in_flight == 10


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "--input"),
        (("--input", "a", "--max_tokens", "translate=5"), "unknown task"),
        (("--input", "a", "--tasks", "ocr,poetry"), "unknown task"),
        (("--input", "a", "--engine_arg", "novalue"), "KEY=VALUE"),
        (("--input", "a", "--host_feeders", "0"), "at least 1"),
    ],
)
def test_bad_options_are_refused_with_a_reason(args, message):
    with pytest.raises(ValueError, match=message):
        config(*args)


def test_every_option_is_documented_in_the_readme():
    import argparse
    import pathlib

    from pipelines.options import VisionBatchOptions

    parser = argparse.ArgumentParser()
    VisionBatchOptions._add_argparse_args(parser)
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    flags = [action.option_strings[0] for action in parser._actions if action.option_strings[0] != "-h"]
    assert [flag for flag in flags if f"`{flag}" not in readme] == []
