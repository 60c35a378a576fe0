"""Measure the `language` column (`tasks.language`) on real text in many languages, by length.

    python -m benchmarks.language [--pages_per_language 40] [--strings_per_language 1500] [--out benchmarks/language.json]

Real text, none written for this project, labelled by where it ships rather than
by any classifier:
- man pages: the translations Debian ships under /usr/share/man/LANG (German,
  French, Japanese, Russian, Chinese, ... from manpages-l10n, man-db, dpkg,
  shadow, apt) and a sample of the English ones under /usr/share/man/man*,
  rendered to plain text by groff as a page would be transcribed. A
  translated page keeps untranslated paragraphs, option names, commands and
  paths in English: every paragraph found verbatim in the English original
  is dropped, so the label (the directory) holds without asking a classifier.
  Windows of ~10 to 4,000 characters are cut from each at word boundaries,
  from a short OCR snippet (a sign, a caption) to a full page.
- interface strings: the translated messages (msgstr differing from msgid) of
  the gettext catalogs under /usr/share/locale/LANG, and their English
  msgids: one to a few words each, the length of a label OCR'd off a photo.

Each text is classified once (py3langid's best language and its normalised
probability); the rule (a letter minimum and a probability minimum) is then
swept over the stored results, so one run gives every cell of the table in
BENCHMARKS.md ("Language") and the reason for the thresholds in tasks/language.py.
"""
from __future__ import annotations

import argparse
import collections
import gettext
import gzip
import json
import pathlib
import random
import subprocess
import time
from typing import Iterator, Optional

from tasks.language import MIN_LETTERS, MIN_PROBABILITY, READ_CHARS, best_guess, iso_639_1, letters

MAN = pathlib.Path("/usr/share/man")
LOCALE = pathlib.Path("/usr/share/locale")
# Directory -> the ISO 639-1 code a right answer carries (pt_BR is Portuguese; zh_CN and zh_TW are Chinese).
MAN_LANGUAGES = {
    "cs": "cs", "da": "da", "de": "de", "es": "es", "fi": "fi", "fr": "fr", "hr": "hr", "hu": "hu", "id": "id",
    "it": "it", "ja": "ja", "ko": "ko", "nl": "nl", "pl": "pl", "pt": "pt", "pt_BR": "pt", "ro": "ro", "ru": "ru",
    "sl": "sl", "sr": "sr", "sv": "sv", "tr": "tr", "uk": "uk", "zh_CN": "zh", "zh_TW": "zh",
}
# Window lengths in characters cut from each page (extended to the end of the last word).
WINDOWS = (8, 16, 24, 32, 48, 64, 96, 160, 320, 1000, 4000)
# Buckets of letters (str.isalpha characters, what the rule counts): lower bounds.
BUCKETS = (0, 4, 8, 12, 16, 20, 24, 32, 48, 64, 128, 256, 1000)
SWEEP_LETTERS = (0, 4, 8, 12, 16, 20, 24, 32, 48)
SWEEP_PROBABILITY = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def bucket(letter_count: int) -> str:
    lower = max(b for b in BUCKETS if b <= letter_count)
    following = [b for b in BUCKETS if b > lower]
    return f"{lower}-{following[0] - 1}" if following else f"{lower}+"


def render(path: pathlib.Path) -> str:
    """The page as `man` shows it, without hyphenation, one paragraph per line, no header or footer."""
    source = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    out = subprocess.run(
        ["groff", "-k", "-mandoc", "-Tutf8", "-rHY=0", "-rLL=2000n", "-P-cbou"],
        input=source, capture_output=True, check=False, timeout=60,
    ).stdout.decode("utf-8", errors="replace")
    lines = [line.strip() for line in out.splitlines()[1:-1]]
    return "\n".join(line for line in lines if line)


def english_original(path: pathlib.Path) -> Optional[pathlib.Path]:
    """The English page a translated page was made from: same section and name under /usr/share/man/manN."""
    original = MAN / path.parent.name / path.name
    return original if original.is_file() else None


def man_pages(directory: str, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `count` pages of the directory's language, as text in that language only.

    A translated page keeps every paragraph the translators have not reached
    (shadow's pages are half English), besides option names, commands and
    paths: those lines appear verbatim in the English original and are
    dropped, so what is left is the directory's language, labelled without a
    classifier. A page without an English original is left out.
    """
    root = MAN / directory if directory != "en" else MAN
    pattern = "man[1-8]/*" if directory == "en" else "man*/*"
    paths = sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())
    rng.shuffle(paths)
    pages = []
    for path in paths:
        if len(pages) == count:
            break
        text = render(path)
        if directory != "en":
            original = english_original(path)
            if original is None:
                continue
            english = {" ".join(line.split()) for line in render(original).splitlines()}
            text = "\n".join(line for line in text.splitlines() if " ".join(line.split()) not in english)
        if letters(text) >= 200:  # a page that only points to another (.so), or hardly translated
            pages.append((str(path), text))
    return pages


def windows(text: str, rng: random.Random, per_length: int) -> Iterator[str]:
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch in " \n"]
    for length in WINDOWS:
        for _ in range(per_length if length < len(text) else 1):
            start = rng.choice([s for s in starts if s < max(1, len(text) - length)] or [0])
            end = start + length
            while end < len(text) and not text[end].isspace():
                end += 1
            yield text[start:end].strip()


def catalog_strings(directory: str) -> Iterator[tuple[str, str]]:
    """(msgid, msgstr) of every translated message in the catalogs under /usr/share/locale/DIR."""
    for path in sorted((LOCALE / directory).rglob("*.mo")):
        try:
            with path.open("rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog  # noqa: SLF001 - the parsed catalog, as gettext holds it
        except (OSError, UnicodeDecodeError, ValueError):  # a catalog gettext cannot read: not part of the corpus
            continue
        for msgid, msgstr in catalog.items():
            if isinstance(msgid, tuple) or not msgid or msgstr == msgid:
                continue  # plural forms' tuples, the header, untranslated messages
            yield msgid, msgstr


def classify(text: str) -> tuple[str, float]:
    """py3langid's best language as the column would name it (ISO 639-1; "" for none), and its probability."""
    code, probability = best_guess(text)
    return iso_639_1(code) or "", round(probability, 4)


def measure(pages_per_language: int, strings_per_language: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    started = time.perf_counter()
    samples: list[dict] = []  # one per text: corpus, truth, letters, predicted code, probability
    documents: dict = {}
    for directory, truth in [("en", "en"), *MAN_LANGUAGES.items()]:
        pages = man_pages(directory, pages_per_language, rng)
        documents[f"man:{directory}"] = len(pages)
        for _, text in pages:
            for window in windows(text, rng, per_length=2):
                code, probability = classify(window)
                samples.append({"corpus": "man", "truth": truth, "letters": letters(window[:READ_CHARS]), "code": code, "p": probability})
    english_ids: set[str] = set()
    for directory, truth in MAN_LANGUAGES.items():
        pairs = list(catalog_strings(directory))
        english_ids.update(msgid for msgid, _ in pairs)
        rng.shuffle(pairs)
        chosen = list(dict.fromkeys(msgstr for _, msgstr in pairs))[:strings_per_language]
        documents[f"strings:{directory}"] = len(chosen)
        for text in chosen:
            code, probability = classify(text)
            samples.append({"corpus": "strings", "truth": truth, "letters": letters(text), "code": code, "p": probability})
    english = sorted(english_ids)
    rng.shuffle(english)
    documents["strings:en"] = min(len(english), strings_per_language)
    for text in english[:strings_per_language]:
        code, probability = classify(text)
        samples.append({"corpus": "strings", "truth": "en", "letters": letters(text), "code": code, "p": probability})
    classify_seconds = time.perf_counter() - started
    return {
        "documents": documents,
        "texts": len(samples),
        "rule": {"min_letters": MIN_LETTERS, "min_probability": MIN_PROBABILITY},
        "by_bucket": by_bucket(samples),
        "by_language": by_language(samples),
        "sweep": sweep(samples),
        "bucket_by_probability": bucket_by_probability(samples),
        "confusions": confusions(samples),
        "wall_s": round(classify_seconds, 1),
    }


def answered(sample: dict, min_letters: int, min_probability: float) -> bool:
    """The rule of tasks.language.language over a stored classification."""
    return sample["letters"] >= min_letters and sample["p"] >= min_probability and sample["code"] != ""


def tally(samples: list[dict], min_letters: int = MIN_LETTERS, min_probability: float = MIN_PROBABILITY) -> dict:
    n = len(samples)
    kept = [s for s in samples if answered(s, min_letters, min_probability)]
    right = sum(s["code"] == s["truth"] for s in kept)
    return {
        "texts": n,
        "top1_accuracy": round(sum(s["code"] == s["truth"] for s in samples) / n, 4) if n else None,  # no rule: the best guess
        "null_rate": round(1 - len(kept) / n, 4) if n else None,
        "precision": round(right / len(kept), 4) if kept else None,  # right among the non-null
        "wrong_rate": round((len(kept) - right) / n, 4) if n else None,  # a wrong language written, of all texts
    }


def by_bucket(samples: list[dict]) -> dict:
    table: dict = {}
    for corpus in ("man", "strings"):
        groups = collections.defaultdict(list)
        for s in samples:
            if s["corpus"] == corpus:
                groups[bucket(s["letters"])].append(s)
        table[corpus] = {name: tally(groups[name]) for name in sorted(groups, key=lambda b: int(b.split("-")[0].rstrip("+")))}
    return table


def by_language(samples: list[dict]) -> dict:
    """Per language, over man-page windows in three length ranges (letters) and interface strings."""
    ranges = {"man <16": (0, 16), "man 16-63": (16, 64), "man 64-255": (64, 256), "man 256+": (256, 10**9)}
    table: dict = {}
    for truth in sorted({s["truth"] for s in samples}):
        row = {}
        for name, (low, high) in ranges.items():
            row[name] = tally([s for s in samples if s["truth"] == truth and s["corpus"] == "man" and low <= s["letters"] < high])
        row["strings"] = tally([s for s in samples if s["truth"] == truth and s["corpus"] == "strings"])
        table[truth] = row
    return table


def sweep(samples: list[dict]) -> dict:
    out: dict = {}
    for corpus in ("man", "strings"):
        chosen = [s for s in samples if s["corpus"] == corpus]
        out[corpus] = {
            f"letters>={letters_min} p>={p_min}": tally(chosen, letters_min, p_min)
            for letters_min in SWEEP_LETTERS for p_min in SWEEP_PROBABILITY
        }
    return out


def bucket_by_probability(samples: list[dict]) -> dict:
    """Per length bucket, the null rate and precision at each probability minimum (no letter minimum):
    where the letter minimum has to sit for a given probability minimum."""
    out: dict = {}
    for corpus in ("man", "strings"):
        groups = collections.defaultdict(list)
        for s in samples:
            if s["corpus"] == corpus:
                groups[bucket(s["letters"])].append(s)
        names = sorted(groups, key=lambda b: int(b.split("-")[0].rstrip("+")))
        out[corpus] = {
            f"p>={p_min}": {name: {k: v for k, v in tally(groups[name], 0, p_min).items() if k in ("null_rate", "precision")} for name in names}
            for p_min in SWEEP_PROBABILITY
        }
    return out


def confusions(samples: list[dict], top: int = 25) -> list:
    """The most frequent wrong answers the rule lets through: (truth, answered, count)."""
    counts = collections.Counter(
        (s["truth"], s["code"]) for s in samples if answered(s, MIN_LETTERS, MIN_PROBABILITY) and s["code"] != s["truth"]
    )
    return [[truth, code, n] for (truth, code), n in counts.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages_per_language", type=int, default=40)
    parser.add_argument("--strings_per_language", type=int, default=1500)
    parser.add_argument("--out", default="benchmarks/language.json")
    args = parser.parse_args()
    result = measure(args.pages_per_language, args.strings_per_language)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("documents", "texts", "rule", "by_bucket", "confusions", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
