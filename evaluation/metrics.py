"""Pure scoring functions: OCR error rates (jiwer), detection AP (pycocotools), caption chrF (sacrebleu).

Established libraries, not re-implementations, so numbers are comparable
with what other tools report. Everything here takes plain values and
returns frozen dataclasses; joining references with results happens in
`evaluation.scoring`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import re
import unicodedata
from typing import Iterable, Mapping, Optional, Sequence

import jiwer
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sacrebleu.metrics import CHRF

from library.text_layer import comparable as normalize_text  # NFKC, whitespace runs as one space

# COCO's default cap of 100 detections per image would silently drop most
# word boxes of a dense text page; the cap is raised to the densest item.
COCO_DEFAULT_MAX_DETS = 100


_FENCE = re.compile(r"^\s*```.*$", re.MULTILINE)
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$", re.MULTILINE)
_HORIZONTAL_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$", re.MULTILINE)
_LINE_MARKERS = re.compile(r"^\s*(#{1,6}\s+|>\s?|[-*+]\s+(\[[ xX]\]\s+)?)", re.MULTILINE)
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_HTML_BREAK = re.compile(r"<\s*(br|/?p|/?tr|/?td|/?th|/?li|/?div|/?table)\b[^>]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EMPHASIS = re.compile(r"(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\1(?![\w*])")
# Math delimiters, not dollar amounts: $$...$$, \(...\), \[...\], and $...$ with no space inside its
# ends and no digit right after it (pandoc's rule), so "$4.50 and $3" stays as written.
_DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_INLINE_MATH = re.compile(r"(?<!\$)\$(?=\S)([^$\n]+?)(?<=\S)\$(?!\d)")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|$])")
_ESCAPED = 0xE000  # escaped ASCII characters wait in the Unicode private use area
_SET_ASIDE = re.compile("[\ue000-\ue07f]")


def markdown_to_text(markdown: str) -> str:
    """The text a Markdown answer holds, its markup removed, so it is scored like a transcription.

    Removes code fences, table rules and pipes, HTML tags (cells and line
    breaks become spaces; entities are decoded), heading, quote and bullet
    markers, emphasis, link and image syntax (a link keeps its text, an
    image goes), horizontal rules, math delimiters (the LaTeX inside stays),
    inline-code backticks and backslash escapes. Numbered-list numbers stay:
    they are the page's text. `normalize_text` then folds the whitespace.
    """
    text = _FENCE.sub("", markdown)
    text = _TABLE_RULE.sub("", text)
    text = _HORIZONTAL_RULE.sub("", text)
    text = _DISPLAY_MATH.sub(lambda m: next(group for group in m.groups() if group is not None), text)
    # Escaped characters are text, never markup: set aside until the markup is gone.
    text = _ESCAPE.sub(lambda m: chr(_ESCAPED + ord(m.group(1))), text)
    text = html.unescape(_HTML_TAG.sub("", _HTML_BREAK.sub(" ", text)))
    text = _LINE_MARKERS.sub("", text).replace("|", " ")
    text = _LINK.sub(r"\1", _IMAGE.sub("", text))
    text = _EMPHASIS.sub(r"\2", _STRONG.sub(r"\2", text))
    text = _INLINE_MATH.sub(r"\1", text).replace("`", "")
    return _SET_ASIDE.sub(lambda m: chr(ord(m.group()) - _ESCAPED), text)


@dataclasses.dataclass(frozen=True)
class TextErrors:
    """Edit counts of a hypothesis against a reference, at character and word level.

    Counts (not rates) so items add up to corpus CER/WER: total edits over
    total reference length, which long pages dominate as they should.
    """

    ref_chars: int
    char_edits: int  # substitutions + deletions + insertions
    ref_words: int
    word_edits: int

    @property
    def cer(self) -> float:
        return self.char_edits / self.ref_chars

    @property
    def wer(self) -> float:
        return self.word_edits / self.ref_words


def text_errors(reference: str, hypothesis: str) -> TextErrors:
    """Character and word edits after `normalize_text`; the reference must hold some text."""
    reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
    if not reference:
        raise ValueError("an empty reference has no error rate")
    chars = jiwer.process_characters(reference, hypothesis)
    words = jiwer.process_words(reference, hypothesis)
    return TextErrors(
        ref_chars=chars.hits + chars.substitutions + chars.deletions,
        char_edits=chars.substitutions + chars.deletions + chars.insertions,
        ref_words=words.hits + words.substitutions + words.deletions,
        word_edits=words.substitutions + words.deletions + words.insertions,
    )


def total_text_errors(errors: Iterable[TextErrors]) -> Optional[TextErrors]:
    """Corpus-level counts, or None when nothing was scored."""
    errors = list(errors)
    if not errors:
        return None
    return TextErrors(
        ref_chars=sum(e.ref_chars for e in errors),
        char_edits=sum(e.char_edits for e in errors),
        ref_words=sum(e.ref_words for e in errors),
        word_edits=sum(e.word_edits for e in errors),
    )


@dataclasses.dataclass(frozen=True)
class LabeledBox:
    """A box in the 0-1 frame, (ymin, xmin, ymax, xmax); `score` ranks predictions (1 when unknown)."""

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0


@dataclasses.dataclass(frozen=True)
class AveragePrecision:
    """COCO AP averaged over IoU 0.50:0.95 (`map`) and at IoU 0.50 (`ap50`); None where undefined."""

    map: Optional[float]
    ap50: Optional[float]


@dataclasses.dataclass(frozen=True)
class DetectionScores:
    overall: AveragePrecision
    per_item: Mapping[str, AveragePrecision]


def _coco_dataset(
    boxes_by_item: Mapping[str, Sequence[LabeledBox]], image_ids: Mapping[str, int], categories: Mapping[str, int]
) -> COCO:
    annotations = []
    for item_id, boxes in boxes_by_item.items():
        for box in boxes:
            ymin, xmin, ymax, xmax = box.box
            width, height = xmax - xmin, ymax - ymin
            annotations.append(
                {
                    "id": len(annotations) + 1,  # pycocotools treats id 0 as "unmatched"
                    "image_id": image_ids[item_id],
                    "category_id": categories[box.label],
                    "bbox": [xmin, ymin, width, height],
                    "area": width * height,
                    "iscrowd": 0,
                    "score": box.score,
                }
            )
    dataset = COCO()
    dataset.dataset = {
        "images": [{"id": i} for i in image_ids.values()],
        "categories": [{"id": c} for c in categories.values()],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dataset.createIndex()
    return dataset


def _mean_valid(precision: np.ndarray) -> Optional[float]:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def _average_precision(evaluator: COCOeval) -> AveragePrecision:
    # precision[iou threshold, recall point, category, area range, max dets]; area 0 is "all".
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    at_50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    return AveragePrecision(map=_mean_valid(precision), ap50=_mean_valid(precision[at_50]))


def detection_scores(
    references: Mapping[str, Sequence[LabeledBox]],
    predictions: Mapping[str, Sequence[LabeledBox]],
    match_labels: bool = True,
) -> DetectionScores:
    """COCO mAP and AP50 over the items of `references`, overall and per item.

    Items absent from `predictions` count as predicting nothing. Predictions
    for items without a reference are ignored. With `match_labels=False`
    labels are ignored (class-agnostic AP), which suits free-text model labels
    against "text" references. Per-item AP is None where COCO leaves it
    undefined (no reference box of a predicted label).
    """
    image_ids = {item_id: n + 1 for n, item_id in enumerate(references)}
    predictions = {item_id: predictions.get(item_id, ()) for item_id in references}
    labels = {b.label for boxes in (*references.values(), *predictions.values()) for b in boxes}
    categories = {label: n + 1 for n, label in enumerate(sorted(labels))}
    ground_truth = _coco_dataset(references, image_ids, categories)
    detected = _coco_dataset(predictions, image_ids, categories)
    max_dets = max([COCO_DEFAULT_MAX_DETS, *(len(boxes) for boxes in predictions.values())])

    def evaluate(image_subset: list[int]) -> AveragePrecision:
        evaluator = COCOeval(ground_truth, detected, iouType="bbox")
        evaluator.params.useCats = int(match_labels)
        evaluator.params.maxDets = [max_dets]
        evaluator.params.imgIds = image_subset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            evaluator.evaluate()
            evaluator.accumulate()
        return _average_precision(evaluator)

    # Per item: a COCOeval restricted to that image (accumulate() cannot
    # re-slice an evaluation to fewer images).
    per_item = {item_id: evaluate([image_id]) for item_id, image_id in image_ids.items()}
    overall = evaluate(list(image_ids.values()))
    return DetectionScores(overall=overall, per_item=per_item)


_CHRF = CHRF()


def caption_chrf(hypothesis: str, references: Sequence[str]) -> float:
    """chrF (0-100) of one caption against its acceptable references, best reference wins.

    chrF rather than BLEU: it is stable on one- or two-sentence captions,
    where sentence BLEU is mostly zero n-gram matches.
    """
    return float(_CHRF.sentence_score(hypothesis, list(references)).score)
