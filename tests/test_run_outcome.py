"""Pure pieces of a run's trust: canonical locations, masking, option redaction, the outcome, input selection, --limit."""
from __future__ import annotations

import pytest

from schemas.records import DecodeUnit, ErrorRecord, ItemRef, Stage, UnitKind
from schemas.uris import canonical_uri, mask_credentials, resolve_relative
from transforms.decode import first_items
from transforms.sources import InputSelection, expand_input
from transforms.summary import is_secret_option, outcome, redact


def test_canonical_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_uri("a/./b/../c.png") == f"{tmp_path}/a/c.png"
    assert canonical_uri("a//c.png") == f"{tmp_path}/a/c.png"
    assert canonical_uri("~/x.png").endswith("/x.png") and not canonical_uri("~/x.png").startswith("~")
    # Object stores: names are literal, credentials go.
    assert canonical_uri("gs://my-bucket/a//b/../c.png") == "gs://my-bucket/a//b/../c.png"
    assert canonical_uri("s3://KEY:SECRET@my-bucket/a.png") == "s3://my-bucket/a.png"
    assert canonical_uri("https://h/x.png?X-Goog-Signature=abc&b=1") == "https://h/x.png?X-Goog-Signature=***&b=1"


def test_manifest_entries_resolve_against_the_manifest_folder():
    assert resolve_relative("../img/./a.png", "/data/lists") == "/data/img/a.png"
    assert resolve_relative("../img/a.png", "gs://my-bucket/lists") == "gs://my-bucket/img/a.png"
    assert resolve_relative("gs://other/a.png", "/data/lists") == "gs://other/a.png"
    assert resolve_relative("/abs/a.png", "gs://my-bucket/lists") == "/abs/a.png"


def test_ids_and_messages_never_carry_credentials():
    ref = ItemRef.make("hdfs://analyst:pw@namenode/a.png", page=1)
    assert ref.item_id == "hdfs://namenode/a.png#page=1" and ref.source_uri == "hdfs://namenode/a.png"
    error = ErrorRecord.from_exception(ref, Stage.MATCH, OSError("cannot open s3://KEY:pw@my-bucket/a.png?token=t0k"))
    assert error.message == "cannot open s3://***@my-bucket/a.png?token=***"
    assert mask_credentials("no uri here: user:pw") == "no uri here: user:pw"


@pytest.mark.parametrize("name", ["hf_token", "api_key", "s3_secret_access_key", "db_password", "auth", "my-apikey",
                                  "private_key_file", "credentials"])
def test_secret_option_names(name):
    assert is_secret_option(name)


@pytest.mark.parametrize("name", ["max_tokens", "vision_tokens", "tokenizer", "dataflow_kms_key", "keep_alive", "key_column"])
def test_ordinary_option_names(name):
    assert not is_secret_option(name)


def test_redaction_blanks_secret_options_and_masks_uris_in_the_rest():
    shown = redact({"max_tokens": ["ocr=5"], "vision_tokens": 280, "hf_token": "hf_abc", "input": ["gs://u:p@b/x"],
                    "empty_token": None})
    assert shown == {"max_tokens": ["ocr=5"], "vision_tokens": 280, "hf_token": "<redacted>", "input": ["gs://***@b/x"],
                     "empty_token": None}


@pytest.mark.parametrize(
    "args, state, reason",
    [
        # items_in, items_ok, tasks, skipped, item errors, task errors, balanced, budget
        ((10, 10, 3, 0, 0, 1, True, 0.05), "SUCCEEDED", "1 of 30 task outcomes failed (3.3%), within"),
        ((10, 8, 3, 0, 2, 0, True, 0.05), "FAILED", "error budget exceeded: 6 of 30 task outcomes failed (20.0%)"),
        ((10, 8, 3, 0, 2, 0, True, 0.2), "SUCCEEDED", "6 of 30"),
        ((10, 10, 3, 30, 0, 0, True, 0.0), "SUCCEEDED", "all 10 items were answered by earlier runs"),
        ((3, 0, 3, 0, 3, 0, True, 1.0), "FAILED", "nothing was processed: all 3 inputs failed before the engine"),
        ((0, 0, 3, 0, 0, 0, True, 1.0), "FAILED", "nothing to process"),
        ((10, 10, 3, 0, 0, 0, False, 1.0), "FAILED", "the accounting does not balance"),
    ],
)
def test_outcome(args, state, reason):
    verdict = outcome(*args)
    assert verdict["state"] == state and verdict["reason"].startswith(reason), verdict


def test_selection_of_files_in_folders_and_globs():
    default = InputSelection()
    assert default.keeps("a.png") and default.keeps("sub/b.pdf")
    assert not default.keeps(".DS_Store") and not default.keeps(".git/x.png") and not default.keeps("sub/._a.jpg")
    assert InputSelection(include_hidden=True).keeps(".git/x.png")
    chosen = InputSelection(include=("*.png", "2026/*/*.pdf"), exclude=("draft-*",))
    assert chosen.keeps("x/a.png") and chosen.keeps("2026/05/a.pdf")
    assert not chosen.keeps("2026/05/deep/a.pdf") and not chosen.keeps("b.pdf") and not chosen.keeps("draft-1.png")


def test_an_input_is_a_folder_a_glob_or_a_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f.png").write_bytes(b"x")
    assert expand_input(str(tmp_path / "d")) == (f"{tmp_path}/d/**", f"{tmp_path}/d")
    assert expand_input(f"{tmp_path}/d/") == (f"{tmp_path}/d/**", f"{tmp_path}/d")
    assert expand_input(str(tmp_path / "f.png")) == (str(tmp_path / "f.png"), None)
    assert expand_input(f"{tmp_path}/d/2026/*/x*.png") == (f"{tmp_path}/d/2026/*/x*.png", f"{tmp_path}/d/2026")


def test_limit_cuts_units_to_the_first_items_in_input_order():
    units = [
        DecodeUnit(uri="/b.pdf", kind=UnitKind.PDF, first_page=8, end_page=12, page_count=12),
        DecodeUnit(uri="/b.pdf", kind=UnitKind.PDF, first_page=0, end_page=8, page_count=12),
        DecodeUnit(uri="/a.png", kind=UnitKind.IMAGE, first_page=0, end_page=1, page_count=1),
        DecodeUnit(uri="/c.parquet", kind=UnitKind.PARQUET, first_page=0, end_page=1, page_count=2, rows=100),
    ]
    kept = first_items(units, 5)
    assert [(u.uri, u.first_page, u.max_items) for u in kept] == [("/a.png", 0, 1), ("/b.pdf", 0, 4)]
    kept = first_items(units, 20)
    assert [(u.uri, u.first_page, u.max_items) for u in kept][-1] == ("/c.parquet", 0, 7)
    assert sum(u.max_items for u in kept) == 20
