"""Options -> JobConfig, and the strict command line, without running anything."""
import os

import pytest
from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from configuration.options import JobConfig, UsageError, VisionBatchOptions, build_parser, parse_args, split_commas


def config(*args: str) -> JobConfig:
    return JobConfig.from_options(PipelineOptions(["--output", "out", *args]), "/m", "model", False)


def test_list_options_accept_repeats_and_commas():
    assert split_commas(["ocr=5,caption=6", "detect=7"]) == ("ocr=5", "caption=6", "detect=7")
    assert split_commas(None) == ()
    job = config("--input", "a/*", "--max_tokens", "ocr=5,caption=6", "--incremental_from", "gs://b/x/,gs://b/y")
    assert {t.name: t.max_tokens for t in job.tasks}["caption"] == 6
    assert job.incremental_from == ("gs://b/x", "gs://b/y")


def test_engine_overrides_and_structured_output():
    job = config("--input", "a", "--engine_arg", "max_model_len=16384", "--engine_arg", 'limit_mm_per_prompt={"image": 2}',
                 "--structured_output", "off")
    assert job.engine.engine_args["max_model_len"] == 16384
    assert job.engine.engine_args["limit_mm_per_prompt"] == {"image": 2}
    assert job.engine.engine_args["block_size"] == 32  # untouched profile value
    assert job.engine.structured_output is False
    assert config("--input", "a").engine.structured_output is True  # cpu-tiny's own choice


def test_profile_environment_reaches_the_engine_and_the_users_value_wins(monkeypatch):
    from engine.process import prepare_process

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
    with pytest.raises(UsageError, match=message):
        config(*args)


REQUIRED = ["--input", "in/*", "--output", "out"]


@pytest.mark.parametrize(
    "args, message",
    [
        # Misspelt and unknown options: refused, with the option meant.
        (["--max_token", "caption=4"], r"unknown option --max_token; did you mean --max_tokens\?"),
        (["--max_token=4"], r"did you mean --max_tokens\?"),
        (["--pdf-dpi", "100"], r"did you mean --pdf_dpi\?"),
        (["--no_such_thing"], r"unknown option --no_such_thing"),
        (["-x"], r"two dashes"),
        # An unquoted glob, expanded by the shell into several arguments.
        (["--input", "a.png", "b.png", "c.png"], r"unexpected arguments 'b.png', 'c.png' after --input: .*quote it"),
        (["--run_id", "a", "b"], r"unexpected argument\(s\) 'b' after --run_id"),
        # Values checked at parse time, naming the option and what it accepts.
        (["--tasks", "captions"], r"--tasks captions: unknown task 'captions'; choose from ocr, caption, detect, markdown, layout; did you mean caption\?"),
        (["--tasks", ","], r"--tasks ',': no task given"),
        (["--max_tokens", "ocr=abc"], r"--max_tokens ocr=abc: N must be a whole number"),
        (["--max_tokens", "ocr=0"], r"--max_tokens ocr=0: N must be a whole number of tokens, at least 1"),
        (["--max_tokens", "poem=3"], r"--max_tokens poem=3: unknown task 'poem'"),
        (["--task_vision_tokens", "ocr=300"], r"--task_vision_tokens ocr=300: budgets are 70, 140, 280, 560, 1120"),
        (["--vision_tokens", "300"], r"argument --vision_tokens: invalid choice: 300 \(choose from 70, 140, 280, 560, 1120\)"),
        (["--thinking", "yes"], r"argument --thinking: invalid choice: 'yes'"),
        (["--tiny_preset", "tiny-dense"], r"argument --tiny_preset: invalid choice: 'tiny-dense'"),
        (["--task_file", "/nowhere/tasks.yaml"], r"--task_file /nowhere/tasks.yaml does not exist"),
        (["--gcs_retry_timeout_s", "0"], r"--gcs_retry_timeout_s 0.0: must be seconds, above 0"),
        (["--gcs_retry_initial_delay_s", "5", "--gcs_retry_max_delay_s", "1"], r"GCS retry budget needs .*--gcs_retry_max_delay_s"),
        (["--engine_profile", "gpu"], r"argument --engine_profile: invalid choice: 'gpu' \(choose from 'cpu', 'cpu-tiny', 'gpu-h100"),
        (["--limit", "0"], r"--limit 0: must be a whole number of items, at least 1"),
        (["--limit", "x"], r"argument --limit: invalid int value: 'x'"),
        (["--max_error_fraction", "1.5"], r"--max_error_fraction 1.5: must be a fraction between 0 and 1"),
        (["--pdf_dpi", "0"], r"--pdf_dpi 0.0: must be a resolution above 0"),
        (["--replace_output=maybe"], r"argument --replace_output: expected true or false"),
        (["--log_level", "LOUD"], r"argument --log_level: invalid choice: 'LOUD'"),
        (["--structured_output", "yes"], r"invalid choice: 'yes' \(choose from 'profile', 'on', 'off'\)"),
        # Beam's own options are validated too.
        (["--direct_num_workers", "two"], r"argument --direct_num_workers: invalid int value"),
        (["--direct_running_mode", "fast"], r"argument --direct_running_mode: invalid choice"),
    ],
)
def test_command_line_mistakes_are_one_line_usage_errors(args, message):
    with pytest.raises(UsageError, match=message) as refused:
        parse_args([*REQUIRED, *args])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("missing, message", [(["--input", "a"], "--output"), (["--output", "o"], "--input")])
def test_required_options(missing, message):
    with pytest.raises(UsageError, match=message):
        parse_args(missing)


def test_beams_own_options_pass_through():
    options = parse_args([
        *REQUIRED, "--runner", "DataflowRunner", "--project", "my-project", "--region", "us-east5",
        "--temp_location", "gs://my-bucket/tmp", "--experiments=no_use_multiple_sdk_containers",
        "--number_of_worker_harness_threads", "8", "--direct_num_workers=2", "--direct_running_mode", "multi_processing",
        "--replace_output", "--include_hidden=false",
    ])
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("my-project", "us-east5", "gs://my-bucket/tmp")
    assert options.get_all_options()["number_of_worker_harness_threads"] == 8
    assert options.view_as(DirectOptions).direct_num_workers == 2
    opts = options.view_as(VisionBatchOptions)
    assert opts.replace_output is True and opts.include_hidden is False


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = build_parser()
    ours = [a for a in parser._actions if a.help != "==SUPPRESS==" and a.option_strings[0] not in ("-h", "--help_beam")]
    assert len(ours) == len([a for a in _option_actions() if a.option_strings])
    formatter = parser._get_formatter()
    for action in ours:
        flag = action.option_strings[0]
        assert flag in text, flag
        shown = formatter._get_help_string(action)
        default = "none" if action.default in (None, "") else "off" if action.default is False else action.default
        assert f"(default: {default})" in shown or "Default" in shown or "Required" in shown, flag
    assert "--direct_running_mode" not in text and "--help_beam" in text  # Beam's 200 options have their own page


def test_help_beam_lists_beams_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help_beam"])
    text = capsys.readouterr().out
    assert "--runner" in text and "--direct_num_workers" in text and "--max_tokens" in text


def _option_actions():
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    VisionBatchOptions._add_argparse_args(parser)
    return parser._actions


def test_locations_are_canonical_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = config("--input", "scans/../scans/*.png", "--manifest", "./lists/m.txt", "--incremental_from", "runs/*/",
                 "--input", "gs://user:pw@my-bucket/x/*")
    assert job.inputs == (f"{tmp_path}/scans/*.png", "gs://my-bucket/x/*")
    assert job.manifests == (f"{tmp_path}/lists/m.txt",)
    assert job.incremental_from == (f"{tmp_path}/runs/*",)
    assert job.output == f"{tmp_path}/out"


def test_every_option_is_documented_in_the_readme():
    import argparse
    import pathlib

    from configuration.options import VisionBatchOptions

    parser = argparse.ArgumentParser()
    VisionBatchOptions._add_argparse_args(parser)
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    flags = [action.option_strings[0] for action in parser._actions if action.option_strings[0] != "-h"]
    assert [flag for flag in flags if f"`{flag}" not in readme] == []


# --- local paths, checked before anything starts (issue 26) ------------------------------------------

def test_a_manifest_whose_name_holds_a_comma_is_one_manifest(tmp_path):
    manifest = tmp_path / "orders, march.csv"
    manifest.write_text("uri\na.png\n")
    assert config("--input", "a", "--manifest", str(manifest)).manifests == (str(manifest),)
    # A value naming no existing file is a list, as a flex-template parameter passes several.
    assert config("--input", "a", "--manifest", f"{tmp_path}/a.txt,{tmp_path}/b.txt").manifests == (
        f"{tmp_path}/a.txt", f"{tmp_path}/b.txt")


def test_missing_local_inputs_manifests_and_task_files_are_named_in_one_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as refused:
        parse_args([
            "--input", str(tmp_path / "scans"), "--input", str(tmp_path / "empty"),  # an empty folder: the run's row
            "--input", f"{tmp_path}/nowhere/*.png", "--input", "gs://my-bucket/x",  # globs and buckets: the run's
            "--manifest", str(tmp_path / "list.csv"), "--task_file", str(tmp_path / "tasks.yaml"),
            "--output", str(tmp_path / "out"),
        ])
    assert str(refused.value) == (
        f"--input {tmp_path}/scans does not exist; --manifest {tmp_path}/list.csv does not exist; "
        f"--task_file {tmp_path}/tasks.yaml does not exist"
    )


def test_a_local_csv_manifest_without_its_column_is_refused_at_launch(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("\ufeffURI,question\r\na.png,Why?\r\n".encode())
    with pytest.raises(UsageError, match=rf"--manifest {manifest}: CSV manifest has no column 'uri' \(--manifest_column\); "
                                         r"its columns are 'URI', 'question'; did you mean --manifest_column 'URI'\?"):
        parse_args(["--manifest", str(manifest), "--output", str(tmp_path / "out")])
    assert parse_args(["--manifest", str(manifest), "--manifest_column", "URI", "--output", str(tmp_path / "out")])
    with pytest.raises(UsageError, match=rf"--manifest {tmp_path} is a folder: a manifest is a file listing inputs"):
        parse_args(["--manifest", str(tmp_path), "--output", str(tmp_path / "out")])


def test_the_command_line_exits_2_in_one_line_before_the_engine_starts(tmp_path, capsys):
    from pipelines import vision_batch

    with vision_batch.restoring_process_state():
        code = vision_batch.main(["--input", str(tmp_path / "scans"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [f"vision_batch: error: --input {tmp_path}/scans does not exist"]
    assert not (tmp_path / "out").exists()
