"""The sources stage without an engine: manifests as people save them, symlinked folders, missing vs empty inputs."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.records import ErrorRecord
from transforms.sources import InputEntry, InputSelection, ManifestError, _MatchPattern, manifest_entries, match_pattern

# As Excel's "CSV UTF-8 (Comma delimited)" saves it: a byte-order mark, CRLF line ends, names in any script.
EXCEL_CSV = "\ufeffuri,Frage,Kunde\r\nÜberweisung März.png,Was kostet es?,Müller & Söhne\r\nscans/発注書.pdf,Wer hat bestellt?,\r\n"


def entries(path, column: str = "uri") -> list[tuple[str, dict]]:
    return [(entry.pattern, json.loads(entry.metadata) if entry.metadata else {}) for entry in manifest_entries(str(path), column)]


def test_an_excel_csv_manifest_keeps_its_header_and_metadata(tmp_path):
    manifest = tmp_path / "Aufträge März.csv"
    manifest.write_bytes(EXCEL_CSV.encode("utf-8"))
    assert entries(manifest) == [
        (f"{tmp_path}/Überweisung März.png", {"Frage": "Was kostet es?", "Kunde": "Müller & Söhne"}),
        (f"{tmp_path}/scans/発注書.pdf", {"Frage": "Wer hat bestellt?"}),  # the empty cell is no value
    ]


def test_a_text_manifest_with_a_byte_order_mark_keeps_its_absolute_paths(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(f"\ufeff/data/scans/a.png\r\n# a comment\r\nb.png\r\n".encode("utf-8"))
    assert [pattern for pattern, _ in entries(manifest)] == ["/data/scans/a.png", f"{tmp_path}/b.png"]


@pytest.mark.parametrize(
    "text, message",
    [
        # A header other than the column: it was read as an entry, and every row lost its metadata.
        ("URI,question\na.png,Why?\n", r"CSV manifest has no column 'uri' \(--manifest_column\); its columns are 'URI', "
                                       r"'question'; did you mean --manifest_column 'URI'\?"),
        ("path,question\na.png,Why?\n", r"no column 'uri' \(--manifest_column\); its columns are 'path', 'question'"),
        # Two columns of one name: a row kept only the last value.
        ("uri,note,note\na.png,x,y\n", r"CSV manifest has several columns named 'note'"),
    ],
)
def test_a_csv_manifest_without_its_uri_column_or_with_duplicate_columns_is_refused(tmp_path, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=message):
        entries(manifest)


def test_a_parquet_manifest_with_duplicate_columns_is_refused(tmp_path):
    table = pa.Table.from_arrays([pa.array(["a.png"]), pa.array(["x"]), pa.array(["y"])], names=["uri", "note", "note"])
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="Parquet manifest has several columns named 'note'"):
        entries(tmp_path / "m.parquet")


def test_a_manifest_that_is_not_utf8_says_so(tmp_path):
    (tmp_path / "m.csv").write_bytes("uri,Kunde\r\na.png,Müller\r\n".encode("cp1252"))  # Excel's plain "CSV"
    with pytest.raises(ManifestError, match=r'not UTF-8 text .*"CSV UTF-8"'):
        entries(tmp_path / "m.csv")


def test_symlinked_folders_inside_an_input_folder_are_followed_as_named(tmp_path):
    (tmp_path / "archive" / "2026-05").mkdir(parents=True)
    (tmp_path / "archive" / "2026-05" / "a.png").write_bytes(b"png")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "b.png").write_bytes(b"png")
    os.symlink(tmp_path / "archive" / "2026-05", inputs / "current")  # a symlinked folder inside the input folder
    os.symlink(inputs, inputs / "current" / "back")  # a loop back to the input folder: not followed again
    expected = [f"{inputs}/b.png", f"{inputs}/current/a.png"]
    assert [f.uri for f in match_pattern(str(inputs))] == expected
    assert [f.uri for f in match_pattern(f"{inputs}/**")] == expected
    assert [f.uri for f in match_pattern(f"{inputs}/*/*.png")] == [f"{inputs}/current/a.png"]


def no_match_message(pattern: str) -> str:
    [error] = _MatchPattern(InputSelection()).process(InputEntry(pattern))
    record = error.value
    assert isinstance(record, ErrorRecord)
    return f"{record.error_type}: {record.message}"


def test_what_does_not_exist_and_what_matched_nothing_are_told_apart(tmp_path):
    (tmp_path / "empty").mkdir()
    assert no_match_message(str(tmp_path / "missing")) == "NotFound: does not exist"
    assert no_match_message(str(tmp_path / "empty")) == "NoMatch: folder holds no files (or all were excluded, or in this pipeline's output folders)"
    assert no_match_message(f"{tmp_path}/empty/*.png") == "NoMatch: no file matched (or all were excluded, or in this pipeline's output folders)"
