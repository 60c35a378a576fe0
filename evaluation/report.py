"""Render scored runs as a Markdown report (side by side, with differences) and as JSON.

Markdown because it reads well in a terminal, a pull request and a GitHub
issue, which is where "should we switch the nightly job?" gets decided.
The JSON holds every per-item number for notebooks and dashboards.
"""
from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Callable, Optional, Sequence

from evaluation.scoring import RunScores
from schemas.references import ReferenceItem

SNIPPET_CHARS = 60


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    value: Callable[[RunScores], Optional[float]]
    digits: int = 4


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


METRICS = (
    Metric("OCR CER", False, lambda s: s.ocr.cer if s.ocr else None),
    Metric("OCR WER", False, lambda s: s.ocr.wer if s.ocr else None),
    # --text_layer: the pages PDF text layers answered and those the model read, scored apart.
    Metric("OCR CER, text-layer pages", False, lambda s: s.ocr_by_source["text_layer"].cer if "text_layer" in s.ocr_by_source else None),
    Metric("OCR CER, model pages", False, lambda s: s.ocr_by_source["model"].cer if "model" in s.ocr_by_source else None),
    Metric("Markdown CER", False, lambda s: s.markdown.cer if s.markdown else None),
    Metric("Markdown WER", False, lambda s: s.markdown.wer if s.markdown else None),
    Metric("Detection mAP@[.5:.95]", True, lambda s: s.detection.map if s.detection else None),
    Metric("Detection AP50", True, lambda s: s.detection.ap50 if s.detection else None),
    Metric("Caption chrF", True, lambda s: s.caption_chrf, digits=2),
    Metric("Answer score", True, lambda s: _mean([i.score for i in s.answer_items])),
)


def _number(value: Optional[float], digits: int, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    """Table-safe snippet: one line, pipes escaped, shortened."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def short_id(item_id: str) -> str:
    """`gs://bucket/docs/a.pdf#page=3` -> `a.pdf#page=3`: report tables stay narrow."""
    uri, sep, suffix = item_id.partition("#")
    return posixpath.basename(uri) + sep + suffix


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _coverage(items: Sequence[Any]) -> str:
    """`12 (1 missing, 2 truncated)`: how many items a figure rests on, and how many had no answer."""
    if not items:
        return "–"
    missing = sum(i.missing for i in items)
    truncated = sum(getattr(i, "truncated", False) for i in items)  # OCR and markdown items only
    return f"{len(items)} ({missing} missing" + (f", {truncated} truncated)" if truncated else ")")


@dataclasses.dataclass(frozen=True)
class PerItemMetric:
    """A task's per-item score: what coverage, worst-item and change tables are built from."""

    task: str
    name: str
    higher_is_better: bool
    items: Callable[[RunScores], Sequence[Any]]
    value: Callable[[Any], Optional[float]]
    key: Callable[[Any], str] = lambda item: item.item_id  # what identifies an item's score across runs


PER_ITEM_METRICS = (
    PerItemMetric("OCR", "CER", False, lambda s: s.ocr_items, lambda i: i.errors.cer),
    PerItemMetric("Markdown", "CER", False, lambda s: s.markdown_items, lambda i: i.errors.cer),
    PerItemMetric("Detection", "mAP", True, lambda s: s.detect_items, lambda i: i.ap.map),
    PerItemMetric("Caption", "chrF", True, lambda s: s.caption_items, lambda i: i.chrf),
    PerItemMetric("Answers", "score", True, lambda s: s.answer_items, lambda i: i.score, lambda i: i.key),
)


def summary_table(runs: Sequence[RunScores]) -> list[str]:
    """Metrics side by side; with several runs, each later run's difference from the first."""
    first = runs[0]
    header = ["metric", *(r.run.label for r in runs)]
    header += [f"Δ {r.run.label} − {first.run.label}" for r in runs[1:]]
    rows = []
    for metric in METRICS:
        values = [metric.value(r) for r in runs]
        if all(v is None for v in values):
            continue
        arrow = "↑" if metric.higher_is_better else "↓"
        deltas = [
            _number(None if v is None or values[0] is None else v - values[0], metric.digits, signed=True)
            for v in values[1:]
        ]
        rows.append([f"{metric.name} {arrow}", *(_number(v, metric.digits) for v in values), *deltas])
    for metric in PER_ITEM_METRICS:
        if any(metric.items(r) for r in runs):
            rows.append([f"{metric.task} items", *(_coverage(metric.items(r)) for r in runs), *([""] * (len(runs) - 1))])
    return _table(header, rows)


def _runs_table(runs: Sequence[RunScores]) -> list[str]:
    rows = [
        [
            s.run.label,
            f"`{s.run.location}`",
            ", ".join(s.run.model_ids),
            ", ".join(s.run.prompt_versions),
            ", ".join(s.run.run_ids),
            str(s.matched_items),
            str(s.extra_items),
            str(s.run.duplicate_rows),
        ]
        for s in runs
    ]
    header = ["run", "location", "model", "prompt version", "run id", "items matched", "items without reference",
              "answers superseded"]
    return _table(header, rows)


def _worst(scores: RunScores, count: int) -> list[str]:
    lines: list[str] = []
    for task, items in (("OCR", scores.ocr_items), ("Markdown (markup removed)", scores.markdown_items)):
        if not items:
            continue
        worst = sorted(items, key=lambda i: -i.errors.cer)[:count]
        lines += [f"### {task}: highest CER ({scores.run.label})", ""]
        lines += _table(
            ["item", "CER", "WER", "reference", "output"],
            [[short_id(i.item_id), f"{i.errors.cer:.4f}", f"{i.errors.wer:.4f}", _cell(i.reference),
              "*(missing)*" if i.missing else _cell(i.hypothesis)] for i in worst],
        )
    if scores.detect_items:
        worst_boxes = sorted(scores.detect_items, key=lambda i: (i.ap.map is None, i.ap.map or 0.0))[:count]
        lines += [f"### Detection: lowest mAP ({scores.run.label})", ""]
        lines += _table(
            ["item", "mAP", "AP50", "reference boxes", "predicted boxes"],
            [[short_id(i.item_id), _number(i.ap.map, 4), _number(i.ap.ap50, 4), str(i.reference_boxes),
              "*(missing)*" if i.missing else str(i.predicted_boxes)] for i in worst_boxes],
        )
    if scores.caption_items:
        worst_captions = sorted(scores.caption_items, key=lambda i: i.chrf)[:count]
        lines += [f"### Captions: lowest chrF ({scores.run.label})", ""]
        lines += _table(
            ["item", "chrF", "reference", "output"],
            [[short_id(i.item_id), f"{i.chrf:.2f}", _cell(i.reference),
              "*(missing)*" if i.missing else _cell(i.hypothesis)] for i in worst_captions],
        )
    if scores.answer_items:
        worst_answers = sorted(scores.answer_items, key=lambda i: (i.score, i.key))[:count]
        lines += [f"### Answers: lowest scores ({scores.run.label})", ""]
        lines += _table(
            ["item", "task", "score", "question", "expected", "answer"],
            [[short_id(i.item_id), i.task, f"{i.score:.2f}", _cell(i.question) or "–", _cell(i.expected),
              "*(missing)*" if i.missing else _cell(i.answer)] for i in worst_answers],
        )
    return lines


def _changes(metric: PerItemMetric, first: RunScores, other: RunScores, count: int) -> list[str]:
    """Items whose score moved most between two runs, regressions first."""
    before = {metric.key(i): metric.value(i) for i in metric.items(first)}
    after = {metric.key(i): metric.value(i) for i in metric.items(other)}
    if not before or not after:
        return []  # one of the runs did not attempt the task
    changes = [(item, before[item], value) for item, value in after.items()
               if before.get(item) is not None and value is not None and value != before[item]]
    lines = [f"### {metric.task} {metric.name} per item: {other.run.label} vs {first.run.label} (regressions first)", ""]
    if not changes:
        return lines + ["No item changed.", ""]
    sign = -1 if metric.higher_is_better else 1
    changes.sort(key=lambda c: -sign * (c[2] - c[1]))
    return lines + _table(
        ["item", first.run.label, other.run.label, "Δ"],
        [[short_id(item), f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"] for item, a, b in changes[:count]],
    )


def describe_references(location: str, references: Sequence[ReferenceItem]) -> str:
    text = sum(r.text is not None for r in references)
    boxes = sum(r.boxes is not None for r in references)
    captions = sum(bool(r.captions) for r in references)
    answers = sum(len(r.answers or {}) for r in references)
    return (f"`{location}`: {len(references)} items, {text} with text, {boxes} with boxes, "
            f"{captions} with captions, {answers} expected answers")


def render_markdown(runs: Sequence[RunScores], references: str, worst: int = 10) -> str:
    """The whole report; `references` is a one-line description (see `describe_references`)."""
    lines = ["# Evaluation report", "", f"References: {references}.", "", "## Scores", ""]
    lines += summary_table(runs)
    lines += ["## Runs", ""] + _runs_table(runs)
    lines += ["## Worst items", ""]
    for scores in runs:
        lines += _worst(scores, worst)
    if len(runs) > 1:
        lines += ["## Per-item changes", ""]
        for other in runs[1:]:
            for metric in PER_ITEM_METRICS:
                lines += _changes(metric, runs[0], other, worst)
    return "\n".join(lines).rstrip() + "\n"


def _run_json(scores: RunScores) -> dict[str, Any]:
    run = scores.run
    return {
        "label": run.label,
        "location": run.location,
        "model_ids": list(run.model_ids),
        "prompt_versions": list(run.prompt_versions),
        "run_ids": list(run.run_ids),
        "matched_items": scores.matched_items,
        "extra_items": scores.extra_items,
        "duplicate_rows": run.duplicate_rows,
        "overall": {m.name: m.value(scores) for m in METRICS},
        **{
            f"{task}_items": [
                {"item_id": i.item_id, "cer": i.errors.cer, "wer": i.errors.wer, "ref_chars": i.errors.ref_chars,
                 "ref_words": i.errors.ref_words, "missing": i.missing, "truncated": i.truncated}
                for i in items
            ]
            for task, items in (("ocr", scores.ocr_items), ("markdown", scores.markdown_items))
        },
        "detect_items": [
            {"item_id": i.item_id, "map": i.ap.map, "ap50": i.ap.ap50, "reference_boxes": i.reference_boxes,
             "predicted_boxes": i.predicted_boxes, "missing": i.missing}
            for i in scores.detect_items
        ],
        "caption_items": [{"item_id": i.item_id, "chrf": i.chrf, "missing": i.missing} for i in scores.caption_items],
        "answer_items": [dataclasses.asdict(i) for i in scores.answer_items],
    }


def render_json(runs: Sequence[RunScores], references: str) -> dict[str, Any]:
    return {"references": references, "runs": [_run_json(s) for s in runs]}
