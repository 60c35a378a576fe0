"""Reading order of a page's text segments by recursive XY-cut: a pure function of their boxes.

Nagy & Seth 1984, "Hierarchical representation of optically scanned
documents" (Proc. 7th ICPR): a page region is cut recursively along the
widest blank gap that crosses the whole region, a vertical gap into columns
(read left to right), a horizontal gap into rows (read top to bottom), until
no gap is left; the leaves are read in the order their segments were written.
`reading_order` returns None when no cut into columns is found anywhere: a
single-column page keeps the order of its content stream, which for
generated documents is the author's order, sub- and superscripts included.

Boxes are PDF user space (`left, bottom, right, top`, y grows upwards).
"""
from __future__ import annotations

from typing import Optional, Sequence

Box = tuple[float, float, float, float]  # left, bottom, right, top

# A vertical gap splits a region into columns only when it is at least as wide as the segments' median height
# (an em, roughly: word spaces are a third of it, a column gutter one or more) ...
MIN_COLUMN_GAP_EMS = 1.0
# ... and when the text on both sides spans at least this fraction of the page's text width: a running head's
# page number, a definition list's narrow term column ("x    an R object", R's reference manual) and a table's
# columns (R-data.pdf's ftable output, page 18) are no columns of text and stay as written. A third admits
# two-column layouts (each column about half); three or more narrow columns stay in content-stream order.
MIN_COLUMN_FRACTION = 1 / 3
# ... and when both sides hold at least this many line segments: one line's wide justified word space is no gutter ...
MIN_COLUMN_LINES = 3
# ... and run down at least this fraction of the page's text height: code with comments aligned after wide spaces
# (fullrefman.pdf's `pipeOp` and `Sys.localeconv` examples) is a few lines, columns of text most of a page.
MIN_COLUMN_HEIGHT_FRACTION = 0.25


def _widest_gap(spans: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(width, position) of the widest gap between the union of `spans` (low, high); width 0 when none."""
    ordered = sorted(spans)
    best, position = 0.0, 0.0
    reach = ordered[0][1]
    for low, high in ordered[1:]:
        if low - reach > best:
            best, position = low - reach, (low + reach) / 2
        reach = max(reach, high)
    return best, position


def _column_cut(boxes: Sequence[Box], indices: list[int], min_gap: float, min_size: tuple[float, float]) -> Optional[tuple[float, float]]:
    """(width, position) of the widest vertical gap crossing the region when it cuts it into two real columns."""
    spans = [(boxes[i][0], boxes[i][2]) for i in indices]
    width, position = _widest_gap(spans)
    if width < min_gap:
        return None
    min_width, min_height = min_size
    for side in ([boxes[i] for i in indices if boxes[i][2] <= position], [boxes[i] for i in indices if boxes[i][0] >= position]):
        if max(box[3] for box in side) - min(box[1] for box in side) < min_height:
            return None
    left_width = max(s[1] for s in spans if s[1] <= position) - min(s[0] for s in spans)
    right_width = max(s[1] for s in spans) - min(s[0] for s in spans if s[0] >= position)
    lines = min(sum(s[1] <= position for s in spans), sum(s[0] >= position for s in spans))
    return (width, position) if lines >= MIN_COLUMN_LINES and min(left_width, right_width) >= min_width else None


def _cut(boxes: Sequence[Box], indices: list[int], min_gap: float, min_size: tuple[float, float], columns: list[int]) -> list[int]:
    if len(indices) < 2:
        return indices
    row_gap, row_at = _widest_gap([(boxes[i][1], boxes[i][3]) for i in indices])
    column = _column_cut(boxes, indices, min_gap, min_size)
    above = [i for i in indices if boxes[i][1] >= row_at] if row_gap > 0 else indices
    below = [i for i in indices if boxes[i][1] < row_at] if row_gap > 0 else []
    # A line or two set off by a line's height or more (a running head, a footer) is cut off first, whatever the
    # gutter's width: it is read before (after) the columns. Otherwise the wider gap is the higher-level cut.
    head_or_foot = row_gap >= min_gap and min(len(above), len(below)) < MIN_COLUMN_LINES
    if column is not None and column[0] > row_gap and not head_or_foot:
        column_at = column[1]
        columns.append(1)
        left = [i for i in indices if boxes[i][2] <= column_at]
        right = [i for i in indices if boxes[i][2] > column_at]
        return _cut(boxes, left, min_gap, min_size, columns) + _cut(boxes, right, min_gap, min_size, columns)
    if row_gap > 0:
        return _cut(boxes, above, min_gap, min_size, columns) + _cut(boxes, below, min_gap, min_size, columns)
    return indices  # no gap crosses the region: as written


def reading_order(boxes: Sequence[Box]) -> Optional[list[int]]:
    """The indices of `boxes` (text segments in content-stream order) in reading order by recursive XY-cut,
    or None when the page has no columns (then the content stream's order is the reading order)."""
    if len(boxes) < 2:
        return None
    heights = sorted(box[3] - box[1] for box in boxes)
    min_gap = MIN_COLUMN_GAP_EMS * heights[len(heights) // 2]
    min_size = (MIN_COLUMN_FRACTION * (max(box[2] for box in boxes) - min(box[0] for box in boxes)),
                MIN_COLUMN_HEIGHT_FRACTION * (max(box[3] for box in boxes) - min(box[1] for box in boxes)))
    columns: list[int] = []  # one entry per column cut made
    order = _cut(boxes, list(range(len(boxes))), min_gap, min_size, columns)
    return order if columns else None
