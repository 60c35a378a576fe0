"""Join a run's results with the reference set and score every task that has references.

An item with a reference but no result row (an error row, a crash, a
missing page) scores as an empty answer and is counted as missing: a run
must not look better by failing on its hardest pages.

`ocr` and `markdown` are scored against the same reference text, the
markdown with its markup removed first (`markdown_to_text`), so the two
compare with each other and with a plain-text baseline (Tesseract).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from evaluation.metrics import (
    AveragePrecision,
    LabeledBox,
    TextErrors,
    caption_chrf,
    detection_scores,
    markdown_to_text,
    normalize_text,
    text_errors,
    total_text_errors,
)
from evaluation.runs import RunResults, claim_key
from schemas.references import BOX_KEYS, ReferenceItem
from tasks.kinds import kind_of


@dataclasses.dataclass(frozen=True)
class OcrItem:
    item_id: str
    errors: TextErrors
    missing: bool  # no ocr result row: scored as an empty transcription
    truncated: bool  # the model hit its token limit (raise --max_tokens ocr=...)
    reference: str
    hypothesis: str
    # Where the answer came from (results' text_source): model or text_layer. A missing row counts as the
    # model's: a text-layer answer never fails. Older results, without the column, are all the model's.
    text_source: str = "model"


@dataclasses.dataclass(frozen=True)
class DetectItem:
    item_id: str
    ap: AveragePrecision
    reference_boxes: int
    predicted_boxes: int
    missing: bool


@dataclasses.dataclass(frozen=True)
class CaptionItem:
    item_id: str
    chrf: float
    missing: bool
    reference: str  # the first reference caption, for the report
    hypothesis: str


@dataclasses.dataclass(frozen=True)
class AnswerItem:
    """One answer of a task with an expected answer in the references (`answers`)."""

    item_id: str
    task: str
    question: str  # the instruction as sent (the results' `instruction`); "" when the task has no result
    expected: str  # the expected text, or JSON document as JSON text
    answer: str  # the run's text, or its `data` for a json task
    score: float  # 0-1: exact match (text) or the share of expected fields matched (JSON)
    missing: bool

    @property
    def key(self) -> str:
        return f"{self.item_id} {self.task}"


@dataclasses.dataclass(frozen=True)
class RunScores:
    """One run scored against one reference set: overall figures and the per-item rows behind them."""

    run: RunResults
    ocr: Optional[TextErrors]  # corpus totals; None when no item has a reference text
    ocr_items: tuple[OcrItem, ...]
    markdown: Optional[TextErrors]  # the markdown task's text (markup removed) against the same references
    markdown_items: tuple[OcrItem, ...]
    detection: Optional[AveragePrecision]
    detect_items: tuple[DetectItem, ...]
    caption_chrf: Optional[float]  # mean of per-item chrF
    caption_items: tuple[CaptionItem, ...]
    answer_items: tuple[AnswerItem, ...]  # expected answers of other tasks (questions, JSON extraction)
    matched_items: int  # reference items with at least one result row
    extra_items: int  # items in the results that no reference covers
    # OCR corpus totals per text_source (--text_layer): the layer's pages and the model's, scored apart.
    ocr_by_source: Mapping[str, TextErrors] = dataclasses.field(default_factory=dict)


Answer = tuple[ReferenceItem, Optional[Mapping[str, Any]]]  # a reference and the run's row for it (None: missing)


def _answers(run: RunResults, references: Mapping[str, ReferenceItem], task: str,
             has_reference: Callable[[ReferenceItem], bool]) -> list[Answer]:
    """The items `task` is scored on; none when the run never attempted the task."""
    if task not in run.tasks:
        return []
    return [(ref, run.rows.get((key, task))) for key, ref in references.items() if has_reference(ref)]


def _text(row: Optional[Mapping[str, Any]]) -> str:
    return (row or {}).get("text") or ""


def _score_text(answers: list[Answer], as_text: Callable[[str], str] = lambda text: text) -> tuple[OcrItem, ...]:
    """Transcriptions against the reference text; `as_text` turns the answer into plain text first."""
    return tuple(
        OcrItem(
            item_id=reference.ref.item_id,
            errors=text_errors(reference.text or "", as_text(_text(row))),
            missing=row is None,
            truncated=bool(row and row["truncated"]),
            reference=reference.text or "",
            hypothesis=as_text(_text(row)),
            text_source=(row or {}).get("text_source") or "model",
        )
        for reference, row in answers
    )


def by_source(items: Sequence[OcrItem]) -> dict[str, TextErrors]:
    """Corpus totals of each text_source group of `items`."""
    groups: dict[str, list[TextErrors]] = {}
    for item in items:
        groups.setdefault(item.text_source, []).append(item.errors)
    return {source: total for source, errors in sorted(groups.items()) if (total := total_text_errors(errors))}


def _same(expected: Any, got: Any) -> bool:
    """Values equal as a reader would judge them: text up to case and spacing, numbers numerically."""
    if isinstance(expected, str) and isinstance(got, str):
        return normalize_text(expected).casefold() == normalize_text(got).casefold()
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(expected, bool) and not isinstance(got, bool):
        return float(expected) == float(got)
    return expected == got


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _leaves(inner, (*path, key))
    elif isinstance(value, list) and value:
        for index, inner in enumerate(value):
            yield from _leaves(inner, (*path, index))
    else:
        yield path, value


def _at(document: Any, path: tuple) -> Any:
    for step in path:
        if isinstance(document, dict) and step in document:
            document = document[step]
        elif isinstance(document, list) and isinstance(step, int) and step < len(document):
            document = document[step]
        else:
            return _ABSENT
    return document


_ABSENT = object()


def answer_score(expected: Any, row: Optional[Mapping[str, Any]]) -> float:
    """1/0 for a text answer (exact up to case and spacing); for a JSON document, the share of expected fields it has right."""
    if row is None:
        return 0.0
    if isinstance(expected, str):
        return float(_same(expected, _text(row)))
    document = kind_of(row).document(row)  # None: the kind answers with no document (text, boxes)
    document = _ABSENT if document is None else document
    leaves = list(_leaves(expected))
    return sum(_same(value, _at(document, path)) for path, value in leaves) / len(leaves)


def _score_answers(run: RunResults, references: Mapping[str, ReferenceItem]) -> tuple[AnswerItem, ...]:
    items = []
    for key, reference in references.items():
        for task, expected in sorted((reference.answers or {}).items()):
            if task not in run.tasks:
                continue
            row = run.rows.get((key, task))
            items.append(AnswerItem(
                item_id=reference.ref.item_id,
                task=task,
                question=(row or {}).get("instruction") or "",
                expected=expected if isinstance(expected, str) else json.dumps(expected, ensure_ascii=False),
                answer=kind_of(row).answer_text(row) if row else "",
                score=answer_score(expected, row),
                missing=row is None,
            ))
    return tuple(items)


def _predicted_boxes(row: Optional[Mapping[str, Any]]) -> tuple[LabeledBox, ...]:
    regions = (kind_of(row).regions(row) or ()) if row else ()
    return tuple(
        LabeledBox(label=d["label"] or "", box=tuple(d["box"][k] for k in BOX_KEYS))  # type: ignore[arg-type]
        for d in regions
    )


def _score_detection(answers: list[Answer], match_labels: bool) -> tuple[Optional[AveragePrecision], tuple[DetectItem, ...]]:
    if not answers:
        return None, ()
    truth = {ref.ref.item_id: tuple(LabeledBox(b.label, b.box) for b in ref.boxes or ()) for ref, _ in answers}
    predicted = {ref.ref.item_id: _predicted_boxes(row) for ref, row in answers}
    scores = detection_scores(truth, predicted, match_labels=match_labels)
    items = tuple(
        DetectItem(
            item_id=ref.ref.item_id,
            ap=scores.per_item[ref.ref.item_id],
            reference_boxes=len(truth[ref.ref.item_id]),
            predicted_boxes=len(predicted[ref.ref.item_id]),
            missing=row is None,
        )
        for ref, row in answers
    )
    return scores.overall, items


def _score_captions(answers: list[Answer]) -> tuple[CaptionItem, ...]:
    return tuple(
        CaptionItem(
            item_id=reference.ref.item_id,
            chrf=caption_chrf(_text(row), reference.captions or ()),
            missing=row is None,
            reference=(reference.captions or ("",))[0],
            hypothesis=_text(row),
        )
        for reference, row in answers
    )


def _has_text(reference: ReferenceItem) -> bool:
    # An empty reference text has no error rate: OCR is not scored for the item.
    return reference.text is not None and bool(normalize_text(reference.text))


def keyed_references(references: Sequence[ReferenceItem], match: str) -> dict[str, ReferenceItem]:
    owners: dict[str, str] = {}
    return {claim_key(owners, item.ref, match): item for item in references}


def score_run(
    run: RunResults, references: Mapping[str, ReferenceItem], match_labels: bool = True
) -> RunScores:
    """Score `run` against references keyed as by `keyed_references` (the same match mode as the run).

    Only tasks the run attempted are scored; the others stay None/empty.
    """
    answered = {key for key, _ in run.rows}
    matched = len(answered & references.keys())
    if answered and not matched:
        raise ValueError(
            f"none of the {len(answered)} items in {run.location} has a reference; if the references were "
            "built from other paths (local copies vs gs://), use --match name"
        )
    ocr_items = _score_text(_answers(run, references, "ocr", _has_text))
    markdown_items = _score_text(_answers(run, references, "markdown", _has_text), markdown_to_text)
    detection, detect_items = _score_detection(
        _answers(run, references, "detect", lambda r: r.boxes is not None), match_labels
    )
    caption_items = _score_captions(_answers(run, references, "caption", lambda r: bool(r.captions)))
    return RunScores(
        run=run,
        ocr=total_text_errors(item.errors for item in ocr_items),
        ocr_items=ocr_items,
        markdown=total_text_errors(item.errors for item in markdown_items),
        markdown_items=markdown_items,
        detection=detection,
        detect_items=detect_items,
        caption_chrf=sum(i.chrf for i in caption_items) / len(caption_items) if caption_items else None,
        caption_items=caption_items,
        answer_items=_score_answers(run, references),
        matched_items=matched,
        extra_items=len(answered - references.keys()),
        ocr_by_source=by_source(ocr_items),
    )
