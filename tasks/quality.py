"""How far an answer can be trusted without reading it: degenerate answers, quality flags, confidence (per field too).

Pure functions of an answer's text, its `finish_reason` and its tokens'
log-probabilities; no engine, no Beam. The engine stage reads every answer
with them (`tasks.task.Task.read`): a degenerate answer of a prose task
climbs the task's retry ladder (`tasks.kinds.base.RetryRung`), and what is
still degenerate after the ladder is kept and flagged in the results'
`quality_flags` column, never silently passed.

An answer is degenerate when it is
- `truncated`: cut by `max_tokens` or by the context length (vLLM ends both
  with finish_reason "length": vllm/v1/request.py, FINISHED_LENGTH_CAPPED);
- `looped`: its tail repeats one span many times (`repeated_tail`);
- `empty`: nothing but whitespace. Only prose answers (text tasks) count:
  an empty list is a valid boxes or layout answer. A blank page never gets
  here: it is answered without the engine (the decode stage flags it `blank`).

`retried` marks an answer a retry rung gave (the first answer was degenerate
or failed validation). Other stages add their own flags to the same column
(`blank`, `rotated`).
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
from typing import Any, Mapping, Optional, Sequence

from tasks.answers import json_values_at

TRUNCATED, LOOPED, EMPTY, RETRIED = "truncated", "looped", "empty", "retried"
# The flags that say an answer is degenerate: they climb the ladder, and --count_flagged_as_errors
# counts rows still carrying one against the error budget. `retried` is not one: the retry settled it.
DEGENERATE_FLAGS: tuple[str, ...] = (TRUNCATED, LOOPED, EMPTY)

# The loop rule's thresholds, measured by benchmarks/loop_rule.py (BENCHMARKS.md, "Loop rule") on text
# none of it written for this: the text layers of 1,287 pages of the PDF manuals Debian ships under
# /usr/share/doc, 3,002 plain-text documents there (READMEs, changelogs, logs) and Tesseract 5's output
# on 40 pages rendered from those manuals, each cut at every 97th character and whole (an answer cut by
# max_tokens ends anywhere): 562,211 cuts. Flagged: 0 of the 34,149 cuts of PDF text and OCR output;
# 14 of the plain-text cuts, 12 in a valgrind log that repeats one stack-frame line 5-6 times (a page
# that does repeat itself, flagged for a look, not failed) and 2 in a tar file read as text. Against
# 6,000 synthetic loops (a word, a line, a sentence, a table row or a paragraph of the same text
# repeated after a real prefix, cut inside its last copy): caught 100% of the sentence loops from 5
# copies, 98-99% of the line and paragraph loops and 97% of the table-row loops from 20 copies; word
# loops are caught once they pass 320 characters (77% at 100 copies of a word). What is missed is
# shorter than what a looping answer cut at max_tokens leaves (thousands of characters). Real runs of
# one character (dot leaders, rule lines, a 219-dash table border) stay under 320.
LOOP_MIN_CHARS = 320  # the repeated tail covers at least this many characters...
LOOP_MIN_COPIES = 8  # ... in at least this many copies of its span,
LOOP_LONG_SPAN = 60  # ... or, for a span this long or longer (a repeated line, sentence or paragraph),
LOOP_LONG_SPAN_COPIES = 5  # ... in at least this many copies
LOOP_MAX_SPAN = 2000  # spans longer than this are not looked for (a repeated page is not a loop the model makes)
_WINDOW = (LOOP_LONG_SPAN_COPIES + 1) * LOOP_MAX_SPAN  # characters of the tail examined: the longest loop, bounded


@dataclasses.dataclass(frozen=True)
class Loop:
    """The tail of an answer repeating `span`: `chars` characters, `copies` whole copies of it."""

    span: str
    copies: int
    chars: int


def repeated_tail(text: str) -> Optional[Loop]:
    """The loop the text ends in, with its shortest span; None when it does not end in one.

    For each span length p (1 to LOOP_MAX_SPAN characters) the tail that is
    p-periodic (every character equals the one p further on) is measured
    backwards from the end; the tail may end in a partial copy, as an
    answer cut by max_tokens does. The first p whose periodic tail passes
    the thresholds above is the loop. Exact repetition only: an answer
    looping with a counter in it ("1. 2. 3. ...") is not caught here.
    Cost: one pass over the span lengths, stopping at each one's first
    mismatch; 0.8-1.9 ms per answer on this shared 2-core machine (the
    measurement's mean over its cuts, two runs).
    """
    tail = text[-_WINDOW:]
    n = len(tail)
    for period in range(1, min(LOOP_MAX_SPAN, n // 2) + 1):
        i = n - period - 1
        while i >= 0 and tail[i] == tail[i + period]:
            i -= 1
        chars = n - 1 - i  # the periodic tail: its first `period` characters and every repeat of them
        copies = chars // period
        needed = LOOP_LONG_SPAN_COPIES if period >= LOOP_LONG_SPAN else LOOP_MIN_COPIES
        if copies >= needed and chars >= LOOP_MIN_CHARS:
            return Loop(span=tail[n - chars: n - chars + period], copies=copies, chars=chars)
    return None


def degenerate_flags(answer: str, finish_reason: str, prose: bool) -> tuple[str, ...]:
    """The degenerate flags of an answer (thought split off), in DEGENERATE_FLAGS order; () when it is sound.

    `prose`: the task's answer is free text (`tasks.kinds.base.OutputKind.prose`), so an empty one is degenerate.
    """
    flags = []
    if finish_reason == "length":
        flags.append(TRUNCATED)
    if repeated_tail(answer) is not None:
        flags.append(LOOPED)
    if prose and not answer.strip():
        flags.append(EMPTY)
    return tuple(flags)


def confidence(logprob_sum: Optional[float], tokens: int) -> Optional[float]:
    """The geometric-mean probability of the answer's tokens: exp(sum of token log-probabilities / tokens).

    In [0, 1]: 1 when the model was certain of every token it wrote, and
    the probability it gave a typical token of the answer otherwise (0.5:
    a coin toss per token, on average). Log-probabilities are vLLM's raw
    ones (`logprobs_mode` "raw_logprobs", vllm/config/model.py): of the
    model's own distribution, before temperature, penalties or a schema's
    constraint, so a sampled retry or a constrained answer is scored as
    the model sees it. A mean over tokens: one misread digit in a long page
    barely moves it; it says how sure the model was of the answer as a
    whole. None when the engine returned no log-probabilities or no token.
    """
    if logprob_sum is None or tokens <= 0:
        return None
    return min(1.0, max(0.0, math.exp(logprob_sum / tokens)))


def object_field_spans(text: str, document: Mapping[str, Any]) -> Optional[dict[str, tuple[int, int]]]:
    """Where each top-level field's value of `document` stands in `text`: {key: (start, end)} character offsets.

    The answer text is the model's raw output (thought channel, code fence,
    prose around the JSON); the document is what the task read from it. The
    first JSON value in the text (`tasks.answers.json_values_at`, the task's
    own reading) that equals the document is read member by member with the
    standard library's `raw_decode`, which returns where each value ends. None
    when no value in the text is the document (it was salvaged from a cut-off list, say).
    """
    start = next((at for at, value in json_values_at(text) if value == dict(document)), None)
    return None if start is None else _object_spans(text, start, json.JSONDecoder(strict=False))


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _object_spans(text: str, start: int, decoder: json.JSONDecoder) -> Optional[dict[str, tuple[int, int]]]:
    """The value span of each member of the JSON object opening at text[start] ("{"); None if it is not one."""
    spans: dict[str, tuple[int, int]] = {}
    at = _skip_space(text, start + 1)
    if text.startswith("}", at):
        return spans
    try:
        while True:
            key, at = decoder.raw_decode(text, at)
            at = _skip_space(text, at)
            if not isinstance(key, str) or not text.startswith(":", at):
                return None
            value_start = _skip_space(text, at + 1)
            _, at = decoder.raw_decode(text, value_start)
            spans[key] = (value_start, at)
            at = _skip_space(text, at)
            if text.startswith("}", at):
                return spans
            if not text.startswith(",", at):
                return None
            at = _skip_space(text, at + 1)
    except (json.JSONDecodeError, RecursionError):
        return None


def field_confidence(
    tokens: Optional[Sequence[tuple[str, float]]], text: str, data: Optional[str],
) -> Optional[tuple[tuple[str, float], ...]]:
    """The confidence of each top-level field of a JSON answer: `confidence`'s formula over its value's tokens.

    `tokens` are the generated tokens in order, each as its decoded text and
    its sampled log-probability (engine.api.EngineResult.tokens); joined, they
    spell the raw answer `text` (and the stop token vLLM leaves out of it), so
    each token covers a known span of it. `data` is the document the task read
    from the answer (the `data` column's JSON text). A field's figure is the
    geometric-mean probability of the tokens that overlap its value's
    characters (a token that also holds the `,` or `"` around it counts: the
    model wrote both at once). Fields in the order the model wrote them. None
    when the tokens are unknown or do not spell the text, when the document
    is not an object, or when it is not found in the text as written (a
    document salvaged from a cut-off list).
    """
    if not tokens or data is None or not "".join(piece for piece, _ in tokens).startswith(text):
        return None
    document = json.loads(data)
    if not isinstance(document, dict):
        return None
    spans = object_field_spans(text, document)
    if spans is None:
        return None
    ends = list(itertools.accumulate(len(piece) for piece, _ in tokens))
    figures = []
    for key, (start, end) in spans.items():
        first = bisect.bisect_right(ends, start)  # the token holding the value's first character
        last = bisect.bisect_left(ends, end)  # ... and its last
        logprobs = [logprob for _, logprob in tokens[first: last + 1]]
        figures.append((key, confidence(math.fsum(logprobs), len(logprobs))))
    return tuple(figures)
