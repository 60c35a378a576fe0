"""The language of a prose answer (the results' `language` column), with py3langid.

py3langid (github.com/adbar/py3langid, BSD-3-Clause) is the maintained fork
of langid.py: a naive Bayes model over byte n-grams of 140 language labels,
shipped inside the package (4.5 MB installed, numpy its only dependency),
~0.1 ms per answer once loaded. Chosen over lingua-language-detector, which
is more accurate on a handful of words but ships ~100 MB of models per
platform, and over fastText's lid.176, whose model is a separate download.

Unsure is null, not a guess: the best language under MIN_PROBABILITY, or no
letter at all (a page number, a total, a date). The probabilities are
py3langid's normalised ones (`norm_probs=True`: scores softmaxed at a
temperature of sqrt(bytes), py3langid/langid.py), so a short text's best
language scores low by itself: length needs no gate of its own.

Measured by `python -m benchmarks.language` (BENCHMARKS.md, "Language") on
text this project did not write, in 24 languages: windows of 8 to 4,000
characters of Debian's man pages (translations with their untranslated
paragraphs removed) and 39,000 interface strings of the gettext catalogs
(translated messages and English originals).
Right (precision) and null (null rate) among texts of a length:

  rule (letters, p)      page windows 16-47 letters | 256+ | strings 4-15 letters      | 16-47
  16, 0.5 (the old one)  0.956-0.979, null 18-41 %  | 0.997-0.999 | all null         | 0.967-0.976
  1, 0.7 (this one)      0.985-0.993, null 28-57 %  | 0.999-1.000 | 0.987-0.995, null 71-83 % | 0.993-0.999

A probability minimum of 0.7 is the knee: from 0.5 to 0.7 the wrong
languages written fall from 1.2 % to 0.4 % of page windows and from 1.7 % to
0.2 % of strings, for 7 and 13 points more nulls; from 0.7 to 0.8 they fall a
further 0.1 point for 4-6 points more nulls. What 0.5-0.7 let through is
mostly the pairs py3langid cannot part (Indonesian read as Malay, Croatian as
Bosnian, Serbian as Macedonian, Czech as Slovak, Portuguese as Galician): at
0.7 they are null. The old 16-letter minimum nulled every short answer,
though 17-29 % of the strings of 4-15 letters score 0.7 or more and are then
right 0.987-0.995 of the time (a word or two of Chinese, Japanese, Russian,
German); it is now 1 letter. Where py3langid is poor: Croatian (right
0.39-0.47 as its best guess, Bosnian otherwise: null 75-99 % under this
rule) and Indonesian (Malay: strings 83 % null).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

# No letter, no language: py3langid falls back to its prior ("12.50", "N/A": "sr" at 0.014).
MIN_LETTERS = 1
# The knee of the measured trade between wrong languages and nulls (module docstring).
MIN_PROBABILITY = 0.7
# py3langid's labels for individual languages of an ISO 639 macrolanguage that has an ISO 639-1 code, as that
# code (SIL, ISO 639-3 macrolanguage mappings, iso639-3.sil.org/code_tables/macrolanguage_mappings: zho holds
# yue and wuu, ara holds arz and ary, uzb holds uzs, grn holds gug). py3langid names Traditional Chinese text
# "yue": most windows of Debian's zh_TW man pages (benchmarks/language.py).
MACROLANGUAGE = {"yue": "zh", "wuu": "zh", "arz": "ar", "ary": "ar", "uzs": "uz", "gug": "gn"}
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


def iso_639_1(code: str) -> Optional[str]:
    """py3langid's label as an ISO 639-1 code: its own two letters, its macrolanguage's, or None.

    py3langid names some languages by ISO 639-3 codes; those outside a
    macrolanguage with a two-letter code ("pcm", "zxx": no linguistic
    content) have none.
    """
    return code if len(code) == 2 else MACROLANGUAGE.get(code)


def language(text: str) -> Optional[str]:
    """The ISO 639-1 code of the text's language; None when there is nothing to tell it by, or it is unsure."""
    if letters(text[:READ_CHARS]) < MIN_LETTERS:
        return None
    code, probability = best_guess(text)
    if probability < MIN_PROBABILITY:
        return None
    return iso_639_1(code)
