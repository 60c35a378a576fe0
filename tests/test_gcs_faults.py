"""gs:// -> gs:// runs through storage that fails: a fault-injecting proxy in front of the GCS emulator.

Transient faults (429, 503, resets, lost answers, cut downloads, slow
answers) on every kind of request the job makes: input listing and reads,
model staging, the Parquet sinks' writes and their finalisation (batch copy
+ delete), the incremental read of an earlier run, the run summary. The run
completes with every item counted once. A fault that persists past the
retry budget fails the run with one line naming the operation and the
object, and leaves no partial output behind.

Every test checks that the proxy really injected the faults it is about: a
fault schedule that never fired would prove nothing.
"""
from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from apache_beam.io.gcp.gcsio import GcsIO
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from configuration.options import JobConfig
from library import storage
from library.storage import BudgetedRetry, RetryBudget
from pipelines import vision_batch
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from tests.conftest import SAMPLES, SMALL_OUTPUTS, run_pipeline
from tests.fault_proxy import FaultProxy, Rule
from tests.gcs_emulator import BUCKET

ROOT = f"gs://{BUCKET}/faults"
# Transient faults must be outlasted: short waits keep the test quick; every schedule below lets the
# third attempt of any request through, far inside the deadline.
QUICK_BACKOFF = ["--gcs_retry_timeout_s", "30", "--gcs_retry_initial_delay_s", "0.05", "--gcs_retry_max_delay_s", "0.5"]
# Persistent faults must be given up on quickly.
SMALL_BUDGET = ["--gcs_retry_timeout_s", "2", "--gcs_retry_initial_delay_s", "0.05", "--gcs_retry_max_delay_s", "0.2"]


@pytest.fixture(scope="module")
def proxy(gcs):
    with FaultProxy(("127.0.0.1", gcs.port)) as running:
        yield running


@pytest.fixture
def faulty(proxy, monkeypatch):
    """Route the job's storage traffic through the proxy (the test's own client still talks to the emulator)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
    proxy.set_rules([])
    yield proxy
    proxy.set_rules([])


@pytest.fixture(scope="module")
def inputs(gcs, tmp_path_factory):
    """A PNG, a 3-page PDF (listed by a manifest), and a file that is no image (one error row)."""
    local = tmp_path_factory.mktemp("fault-inputs")
    (local / "scans").mkdir()
    shutil.copy(SAMPLES / "receipt.png", local / "scans" / "receipt.png")
    (local / "scans" / "notes.txt").write_text("not an image\n")
    (local / "listed").mkdir()
    shutil.copy(SAMPLES / "report.pdf", local / "listed" / "report.pdf")
    (local / "listed" / "manifest.txt").write_text("report.pdf\n")
    return gcs.upload(local, f"{ROOT}/inputs")


ITEMS = 1 + 3  # receipt + 3 PDF pages; notes.txt is one decode error row


def objects(gcs, prefix: str) -> list[str]:
    """Object names under a gs:// prefix, read straight from the emulator (not through the faults)."""
    name = prefix[len(f"gs://{BUCKET}/"):]
    return sorted(blob.name for blob in gcs.client().list_blobs(BUCKET, prefix=name))


def read_table(gcs, output: str, table: str):
    schema = RESULTS_SCHEMA if table == "results" else ERRORS_SCHEMA
    return pq.read_table(f"{output[len('gs://'):]}/{table}", filesystem=gcs.arrow_filesystem(), schema=schema)


TRANSIENT = [
    Rule("list", "429", every=2),
    Rule("stat", "reset", every=3),
    Rule("read", "503", every=3),
    Rule("read", "cut", every=4, first=2),  # a download broken mid-body
    Rule("write-start", "lost", every=2),  # the upload session exists, the client never heard
    Rule("write-chunk", "lost", every=2),  # the object is complete, the client never heard
    Rule("write-chunk", "503", every=3, first=2),
    Rule("copy", "lost", every=2),  # the finalising batch copy happened, the answer was lost
    Rule("delete", "503", every=3),
    Rule("delete", "lost", every=3, first=2),  # the retried delete finds nothing: 404 counts as deleted
    Rule("*", "slow", every=5, delay_ms=30),
]


@pytest.mark.engine
def test_transient_faults_everywhere_leave_a_complete_balanced_run(gcs, faulty, inputs, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("VISION_BATCH_MODEL_DIR", str(tmp_path / "staged"))  # stage the weights through the faults
    model = gcs.upload(tiny_checkpoint, f"{ROOT}/models/transient")
    first, second = f"{ROOT}/runs/transient", f"{ROOT}/runs/transient-again"
    common = ["--input", f"{inputs}/scans/*", "--manifest", f"{inputs}/listed/manifest.txt", "--model", model,
              "--tasks", "caption,detect", *QUICK_BACKOFF]

    faulty.set_rules(TRANSIENT)
    summary = run_pipeline(*common, "--output", first)
    injected = faulty.injected_ops()
    for op in ("list", "stat", "read", "write-start", "write-chunk", "copy", "delete"):
        assert any(kind[0] == op for kind in injected), f"no fault was injected into {op}: {injected}"
    assert injected[("write-chunk", "lost")] and injected[("copy", "lost")] and injected[("read", "cut")]
    assert sum(count for (_, fault), count in injected.items() if fault == "slow")
    staged_reads = [i for i in faulty.injected if i.op == "read" and any("/models/transient/" in o for o in i.objects)]
    assert staged_reads, "model staging never met a fault"

    assert summary["counts"]["items"] == ITEMS and summary["accounting"]["balanced"]
    results = read_table(gcs, first, "results").to_pylist()
    errors = read_table(gcs, first, "errors").to_pylist()
    keys = [(row["item_id"], row["task"]) for row in results]
    assert len(keys) == len(set(keys)) == ITEMS * 2  # every item's tasks once: nothing lost, nothing twice
    assert [(e["stage"], e["error_type"]) for e in errors] == [("decode", "UnsupportedFormat")]
    assert summary["counts"]["result_rows"] == len(results) and summary["counts"]["error_rows"] == 1
    names = objects(gcs, first)
    assert "faults/runs/transient/run_summary.json" in names
    assert not [n for n in names if "beam-temp" in n], "temporary files were left behind"
    listed = [f["path"] for table in ("results", "errors") for f in summary["outputs"][table]]
    assert sorted(listed) == [f"gs://{BUCKET}/{n}" for n in names if n.endswith(".parquet")]  # no stray copies

    # The incremental run reads the first run's results through the faults too.
    faulty.set_rules(TRANSIENT)
    again = run_pipeline(*common, "--output", second, "--incremental_from", first)
    assert faulty.injected, "the incremental run met no fault"
    assert again["counts"]["skipped_items"] == ITEMS and again["counts"]["tasks_submitted"] == 0
    assert again["accounting"]["balanced"] and read_table(gcs, second, "results").num_rows == 0


def run_failing(*args: str, capsys) -> str:
    """Run through main() (the CLI), expecting a failed run; returns its one-line message."""
    code = vision_batch.main([*args, *SMALL_OUTPUTS])
    assert code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run failed: ")]
    assert len(lines) == 1, lines
    return lines[0]


def assert_nothing_left(gcs, output: str) -> None:
    assert objects(gcs, output) == [], "a failed run left files behind"


@pytest.mark.engine
def test_input_that_stays_unreadable_fails_the_run_naming_it(gcs, faulty, inputs, capsys):
    output = f"{ROOT}/runs/unreadable-input"
    faulty.set_rules([Rule("read", "503", object_contains="/listed/report.pdf")])
    line = run_failing("--input", f"{inputs}/scans/receipt.png", "--manifest", f"{inputs}/listed/manifest.txt",
                       "--output", output, "--tasks", "caption", *SMALL_BUDGET, capsys=capsys)
    assert f"storage read of {inputs}/listed/report.pdf still failing" in line and "in 2 s" in line
    assert faulty.injected_ops()[("read", "503")] >= 2  # retried, then given up
    # The other input's results, and the unreadable one's "error row", were never published.
    assert_nothing_left(gcs, output)


@pytest.mark.engine
def test_finalisation_failing_after_one_table_is_published_removes_it(gcs, faulty, inputs, capsys):
    output = f"{ROOT}/runs/half-finalised"
    # Both tables are renamed into place by batch copy + delete; only the errors table's copy keeps failing.
    faulty.set_rules([Rule("copy", "503", object_contains="/half-finalised/errors/")])
    line = run_failing("--input", f"{inputs}/scans/*", "--output", output, "--tasks", "caption", *SMALL_BUDGET, capsys=capsys)
    assert "storage copy of " in line and f"{output}/errors/" in line
    assert faulty.injected_ops()[("copy", "503")] >= 2
    assert faulty.seen["copy"] > faulty.injected_ops()[("copy", "503")]  # the results table's copy went through
    assert "removed its" in line
    assert_nothing_left(gcs, output)


@pytest.mark.engine
def test_summary_that_cannot_be_written_fails_the_run_and_unpublishes_the_tables(gcs, faulty, inputs, capsys):
    output = f"{ROOT}/runs/no-summary"
    faulty.set_rules([Rule("write-start", "reset", object_contains="/no-summary/run_summary.json")])
    line = run_failing("--input", f"{inputs}/scans/receipt.png", "--output", output, "--tasks", "caption",
                       *SMALL_BUDGET, capsys=capsys)
    assert f"storage write of {output}/run_summary.json still failing" in line
    assert faulty.injected_ops()[("write-start", "reset")] >= 2
    assert_nothing_left(gcs, output)


@pytest.mark.engine
def test_model_weights_that_stay_unreadable_fail_the_run_naming_them(gcs, faulty, inputs, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    staged = tmp_path / "staged"
    monkeypatch.setenv("VISION_BATCH_MODEL_DIR", str(staged))
    model = gcs.upload(tiny_checkpoint, f"{ROOT}/models/unreadable")
    output = f"{ROOT}/runs/unreadable-model"
    faulty.set_rules([Rule("read", "503", object_contains="/models/unreadable/model.safetensors")])
    line = run_failing("--input", f"{inputs}/scans/receipt.png", "--output", output, "--model", model,
                       "--tasks", "caption", *SMALL_BUDGET, capsys=capsys)
    assert f"storage read of {model}/model.safetensors still failing" in line
    assert [p.name for p in staged.iterdir() if p.is_dir()] == []  # no half-copied checkpoint on the worker's disk
    assert_nothing_left(gcs, output)


@pytest.mark.engine
def test_budget_reaches_separate_worker_processes(gcs, faulty, inputs, capsys):
    """Workers are other processes (other VMs on Dataflow): the budget travels in the pipeline options."""
    output = f"{ROOT}/runs/multi-process"
    faulty.set_rules([Rule("list", "503", object_contains="/inputs/scans/")])
    line = run_failing("--input", f"{inputs}/scans/*", "--output", output, "--tasks", "caption",
                       "--direct_running_mode=multi_processing", "--direct_num_workers=2", *SMALL_BUDGET, capsys=capsys)
    # The message is built in the worker, from the budget it was given.
    assert f"storage list of {inputs}/scans/ still failing" in line and "in 2 s (--gcs_retry_timeout_s)" in line
    assert faulty.injected_ops()[("list", "503")] >= 2
    assert_nothing_left(gcs, output)


def test_beams_gcs_client_is_built_with_the_jobs_budget(gcs):
    storage.install()  # as a launch does when it validates its options, and every worker through PLUGIN
    client = GcsIO(pipeline_options=PipelineOptions(["--gcs_retry_timeout_s", "7", "--gcs_retry_max_delay_s", "3"]))
    retry = client._storage_client_retry
    assert isinstance(retry, BudgetedRetry) and (retry._timeout, retry._maximum, retry._initial) == (7.0, 3.0, 1.0)
    default = GcsIO(pipeline_options=PipelineOptions([]))._storage_client_retry
    # Without the options: google-cloud-storage's DEFAULT_RETRY (google/api_core/retry/retry_base.py defaults).
    assert (default._timeout, default._maximum, default._initial, default._multiplier) == (120.0, 60.0, 1.0, 2.0)
    assert RetryBudget() == RetryBudget(timeout_s=120.0, initial_delay_s=1.0, max_delay_s=60.0)


def test_an_impossible_budget_is_refused_at_launch(tiny_checkpoint):
    options = PipelineOptions(["--input", "x", "--output", "/tmp/y", "--gcs_retry_initial_delay_s", "5", "--gcs_retry_max_delay_s", "1"])
    with pytest.raises(ValueError, match="gcs_retry"):
        JobConfig.from_options(options, str(tiny_checkpoint), "m", True)


def test_dataflow_workers_are_told_to_load_the_budget(monkeypatch, tmp_path):
    """Dataflow workers import --beam_plugins before any bundle: the job built for Dataflow names the storage module."""
    from launch import run_dataflow
    from launch.job import Workers, plan_launch
    from launch.profiles import PROFILES
    from tests.launch_support import DEPLOYMENT, USER_ARGS, go_offline

    go_offline(monkeypatch, tmp_path)
    launch = plan_launch(PROFILES["tpu-v6e-4"], DEPLOYMENT, Workers.batch(1), "j", USER_ARGS)
    pipeline, _ = run_dataflow.build([*launch.dataflow_args(), "--dry_run=True", *SMALL_BUDGET], check_model=False)
    assert storage.PLUGIN in pipeline.options.view_as(SetupOptions).beam_plugins
    assert RetryBudget.from_options(pipeline.options).timeout_s == 2.0


def test_failed_requests_are_named_as_the_client_library_sends_them():
    """Batch bodies built by google-cloud-storage itself; URLs as it sent them through the proxy."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs_client

    client = gcs_client.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": "http://127.0.0.1:9"})
    bucket = client.bucket("bk")
    batch = client.batch(raise_exception=False)
    batch.__enter__()  # collect deferred requests without sending them
    try:
        bucket.copy_blob(bucket.blob("t/a b.parquet"), bucket, "out/part-0.parquet")
        bucket.copy_blob(bucket.blob("t/c.parquet"), bucket, "out/part-1.parquet")
        _, copies, _ = batch._prepare_batch_request()
    finally:
        client._pop_batch()
    operation, named = storage.describe_request("POST", "http://127.0.0.1:9/batch/storage/v1", copies)
    assert (operation, named) == ("copy", ("gs://bk/t/a b.parquet", "gs://bk/out/part-0.parquet", "gs://bk/t/c.parquet", "gs://bk/out/part-1.parquet"))
    failure = storage.StorageFailure(operation, named, 2.0, 3, "ServiceUnavailable: 503")
    assert "copy of gs://bk/t/a b.parquet -> gs://bk/out/part-0.parquet, gs://bk/t/c.parquet -> gs://bk/out/part-1.parquet" in str(failure)

    base = "http://127.0.0.1:9"
    assert storage.describe_request("GET", f"{base}/storage/v1/b/bk/o?projection=noAcl&prefix=in%2F&prettyPrint=false") == ("list", ("gs://bk/in/",))
    assert storage.describe_request("GET", f"{base}/storage/v1/b/bk/o/in%2Fa.txt?projection=noAcl&prettyPrint=false") == ("stat", ("gs://bk/in/a.txt",))
    assert storage.describe_request("GET", f"{base}/download/storage/v1/b/bk/o/in/a.txt?generation=1&alt=media") == ("read", ("gs://bk/in/a.txt",))
    assert storage.describe_request("DELETE", f"{base}/storage/v1/b/bk/o/out%2Fdst.txt?prettyPrint=false") == ("delete", ("gs://bk/out/dst.txt",))
    # Uploads name their object in the body, or (chunks) only by session: the writer names it (see the summary test).
    assert storage.describe_request("POST", f"{base}/upload/storage/v1/b/bk/o?uploadType=resumable") == ("write", ())
    assert storage.describe_request("PUT", f"{base}/upload/storage/v1/b/bk/o?uploadType=resumable&upload_id=xyz") == ("write", ())
