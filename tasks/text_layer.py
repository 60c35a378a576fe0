"""How a PDF page's text layer takes part in a task: the `--text_layer` modes, each task's route, the anchor prompt.

`route` is the one decision, a pure function of the mode, the task's
`text_layer` use (`Task.text_layer`: `LAYER_USES`), the page's verdict
(`library.text_layer.Verdict`) and whether the page is in the audit
sample (`audited`). Decoding (`transforms.decode`), the engine stage and the
incremental hash pass all ask it, so they agree on every (page, task):

- `model` route: a plain engine request, as before text layers were read;
- `text_layer` route: the answer is the layer's text, no engine request;
- `anchor` route: an engine request whose instruction carries the layer's
  text (`anchored_instruction`), as olmOCR's "document anchoring" did.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

MODES = ("model", "auto", "anchor")
# auto: a team paying for accelerator hours on a mostly born-digital feed wants trusted pages read for
# free, and every other page read by the model as before (README "Born-digital PDFs").
DEFAULT_MODE = "auto"
LAYER_USES = ("none", "answer", "anchor")  # Task.text_layer
MODEL, TEXT_LAYER, ANCHOR = "model", "text_layer", "anchor"  # the routes

# Verdicts (library.text_layer.Verdict values) whose text is worth showing the model.
_ANCHOR_VERDICTS = ("trusted", "partial")

# olmOCR's anchoring prompt (allenai/olmocr, olmocr/prompts/prompts.py, build_finetuning_prompt): the
# layer's text between RAW_TEXT_START and RAW_TEXT_END after the task's own instruction. olmOCR trained
# with at most 6,000 characters of it (allenai/olmocr, olmocr/train config: target_anchor_text_len 6000).
ANCHOR_PROMPT_VERSION = 1  # part of anchored requests' fingerprints: bump with the wording below
ANCHOR_CHARS = 6000
_ANCHOR = (
    "{instruction}\n\nBelow is some raw text that was previously extracted from this page's text layer; it may be "
    "incomplete or out of order. Use it to get the characters right, but follow the image for what the page shows "
    "and its reading order. Do not hallucinate.\nRAW_TEXT_START\n{text}\nRAW_TEXT_END"
)


@dataclasses.dataclass(frozen=True)
class TextLayerSettings:
    """`--text_layer` and `--text_layer_check` as the stages use them."""

    mode: str = DEFAULT_MODE
    check_rate: float = 0.0  # fraction of pages the layer would answer that the model reads too (audit)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"text_layer mode {self.mode!r}: choose {', '.join(MODES)}")
        if not 0.0 <= self.check_rate <= 1.0:
            raise ValueError(f"text_layer_check {self.check_rate}: a fraction from 0 to 1")

    def reads_layer(self, uses: tuple[str, ...]) -> bool:
        """Whether a page's layer can change any route of tasks with these `uses` (else only its verdict is recorded)."""
        return self.mode != "model" and any(use != "none" for use in uses)


def audited(content_hash: str, rate: float) -> bool:
    """Whether a page is in the `--text_layer_check` sample: decided by its content hash, the same in every
    run and stage (a hex sha256, `library.units.item_hash`)."""
    return rate > 0 and int(content_hash[:8], 16) < rate * 0x100000000


def route(settings: TextLayerSettings, use: str, verdict: Optional[str], in_sample: bool) -> str:
    """The route of one task (its `text_layer` use) on one page (its verdict; None: not a PDF page)."""
    if settings.mode == "model" or verdict is None or use == "none":
        return MODEL
    if use == "answer" and verdict == "trusted":
        return MODEL if in_sample else TEXT_LAYER  # the sample is read plainly: agreement unbiased by an anchor
    if settings.mode == "anchor" and verdict in _ANCHOR_VERDICTS:
        return ANCHOR
    return MODEL


def anchored_instruction(instruction: str, layer_text: str) -> str:
    """A task's instruction with the page's layer text appended, at most `ANCHOR_CHARS` of it."""
    return _ANCHOR.format(instruction=instruction, text=layer_text[:ANCHOR_CHARS])
