"""README's "pages I should look at" queries, run as written with DuckDB on results rows the pipeline's own row builder makes."""
from __future__ import annotations

import pathlib
import re

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import ItemInfo, ItemRef, ParsedAnswer, RunInfo, TaskCompletion
from schemas.tables import RESULTS_SCHEMA, result_row

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def readme_query(after: str) -> str:
    """The first ```sql block after the sentence starting with `after`."""
    start = README.index(after)
    return re.search(r"```sql\n(.*?)```", README[start:], re.S).group(1)


def row(item: str, task: str, flags: tuple[str, ...], confidence: float | None, language: str | None = None) -> dict:
    info = ItemInfo(ItemRef.make(f"/scans/{item}.png"), 10, 10, "h" * 64)
    completion = TaskCompletion(
        info=info, task=task, text="x", finish_reason="length" if "truncated" in flags else "stop",
        prompt_tokens=10, generated_tokens=5, cached_tokens=0, latency_s=0.1, quality_flags=flags,
        confidence=confidence, language=language,
    )
    return result_row(completion, RunInfo("run", "model", "v"), ParsedAnswer(text="x"))


def test_the_readme_queries_find_the_pages_to_look_at(tmp_path):
    out = tmp_path / "out" / "sample" / "results"
    out.mkdir(parents=True)
    rows = [
        row("sound", "ocr", (), 0.93, "en"),
        row("sound", "caption", ("retried",), 0.88, "en"),  # settled by a retry: not to look at
        row("cut", "ocr", ("truncated", "retried"), 0.91, "en"),
        row("loop", "ocr", ("truncated", "looped", "retried"), 0.97, "de"),
        row("unsure", "ocr", (), 0.31, "en"),
        row("empty", "ocr", ("empty", "retried"), None),
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), out / "part-0.parquet")
    connection = duckdb.connect()
    connection.execute(f"SET file_search_path = '{tmp_path}'")  # the README's relative 'out/sample/...' paths
    found = connection.execute(readme_query("Pages I should look at")).fetchall()
    assert [(pathlib.Path(item).stem, task) for item, task, *_ in found] == [
        ("empty", "ocr"), ("unsure", "ocr"), ("cut", "ocr"), ("loop", "ocr")]  # least sure first, unscored first of all
    assert found[-1][2] == ["truncated", "looped", "retried"]
    per_task = connection.execute(readme_query("Per task, how many")).fetchall()
    assert [(task, answers, flagged) for task, answers, flagged, *_ in per_task] == [("caption", 1, 0), ("ocr", 5, 3)]
