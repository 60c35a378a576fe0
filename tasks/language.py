"""The language of a prose answer (the results' `language` column), with py3langid.

py3langid (github.com/adbar/py3langid, BSD-3-Clause) is the maintained fork
of langid.py: a naive Bayes model over byte n-grams of 97+ languages, shipped
inside the package (4.5 MB installed, numpy its only dependency), ~0.1 ms per
answer once loaded. Chosen over lingua-language-detector, which is more
accurate on a handful of words but ships ~100 MB of models per platform, and
over fastText's lid.176, whose model is a separate download. Answers are
page transcriptions and captions, long enough for n-gram statistics.

Too short to tell is null, not a guess: fewer than MIN_LETTERS letters (a page
number, a total, "N/A"), or the best language under MIN_PROBABILITY. The
probabilities are py3langid's normalised ones (`norm_probs=True`, scores
softmaxed at a temperature of sqrt(bytes), py3langid/langid.py). Measured on a
few strings: English, German and French sentences of 40+ letters score
0.91-0.98; "Invoice 2024-03 Total 12.50" 0.04 ("ro"); "Hello" 0.06 ("br").
"""
from __future__ import annotations

import functools
from typing import Any, Optional

MIN_LETTERS = 16
MIN_PROBABILITY = 0.5
# Characters of the answer read: the language of a page shows in its first few thousand.
READ_CHARS = 4000


@functools.lru_cache(maxsize=1)
def _identifier() -> Any:
    """py3langid's model, loaded once per process (~2 s: it is xz-compressed in the package)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def letters(text: str) -> int:
    """The letters the rule counts: str.isalpha characters (a CJK ideograph is one)."""
    return sum(ch.isalpha() for ch in text)


def best_guess(text: str) -> tuple[str, float]:
    """py3langid's most likely language of the text's first READ_CHARS characters, and its probability."""
    code, probability = _identifier().classify(text[:READ_CHARS])
    return code, float(probability)


def language(text: str) -> Optional[str]:
    """The ISO 639-1 code of the text's language; None when too short to tell or unsure.

    py3langid names a few languages by ISO 639-3 codes ("ary", "pcm"),
    which have no ISO 639-1 code: None for them too.
    """
    if letters(text[:READ_CHARS]) < MIN_LETTERS:
        return None
    code, probability = best_guess(text)
    if probability < MIN_PROBABILITY or len(code) != 2:
        return None
    return code
