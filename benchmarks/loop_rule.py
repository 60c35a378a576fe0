"""Measure the loop rule (`tasks.quality.repeated_tail`) on real text against synthetic loops.

    python -m benchmarks.loop_rule [--ocr_pages 40] [--out benchmarks/loop_rule.json]

Real text, none written for this: the text layers of the PDF manuals Debian
ships under /usr/share/doc (pypdfium2), the plain-text documents there
(READMEs, changelogs, copyright files: long runs of rule lines and
near-identical entries), and Tesseract's output on pages rendered from those
manuals (real OCR noise). Every text is cut at every 97th character and
whole, because an answer cut by max_tokens ends anywhere: a false positive is
a cut the rule calls a loop. Synthetic loops: a real prefix followed by a span
of the same text (a word, a line, a sentence of ~80 characters, a table row,
a paragraph) repeated; recall is measured per loop length and copy count.
The figures go to BENCHMARKS.md ("Loop rule") and tasks/quality.py.
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import random
import subprocess
import tempfile
import time
from typing import Iterator

import pypdfium2

from tasks.quality import repeated_tail

DOC = pathlib.Path("/usr/share/doc")
CUT_EVERY = 97


def pdf_files() -> list[pathlib.Path]:
    return sorted(p for p in DOC.rglob("*.pdf*") if p.suffix in (".pdf", ".gz") and ".pdf" in p.name and not p.name.endswith(".db.gz"))


def open_pdf(path: pathlib.Path) -> pypdfium2.PdfDocument:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return pypdfium2.PdfDocument(data)


def pdf_pages(max_pages_per_file: int) -> Iterator[tuple[str, str]]:
    for path in pdf_files():
        try:
            pdf = open_pdf(path)
        except Exception:  # noqa: BLE001 - not a PDF pypdfium2 reads: not part of the corpus
            continue
        for index in range(min(len(pdf), max_pages_per_file)):
            text = pdf[index].get_textpage().get_text_range()
            if text.strip():
                yield f"{path}#page={index}", text.replace("\r\n", "\n")


def plain_texts(limit_chars: int = 60_000) -> Iterator[tuple[str, str]]:
    for path in sorted(DOC.rglob("*")):
        if not path.is_file() or path.suffix not in ("", ".gz", ".txt", ".md") or ".ps" in path.suffixes or path.stat().st_size > 2_000_000:
            continue
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = data.decode("utf-8")
        except (UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile):
            continue
        if len(text) > 500 and "\x00" not in text:  # not text: a binary file that happens to decode
            yield str(path), text[:limit_chars]


def ocr_pages(count: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Tesseract's text of `count` pages rendered at 150 dpi from the Debian manuals."""
    rng = random.Random(seed)
    pages = []
    for path in pdf_files():
        try:
            pages.extend((path, index) for index in range(len(open_pdf(path))))
        except Exception:  # noqa: BLE001
            continue
    with tempfile.TemporaryDirectory() as tmp:
        for path, index in rng.sample(pages, min(count, len(pages))):
            image = open_pdf(path)[index].render(scale=150 / 72).to_pil()
            png = pathlib.Path(tmp, "page.png")
            image.save(png)
            text = subprocess.run(["tesseract", str(png), "-", "--psm", "3"], capture_output=True, text=True, check=True).stdout
            if text.strip():
                yield f"tesseract:{path}#page={index}", text


def cuts(text: str) -> Iterator[str]:
    for end in range(CUT_EVERY, len(text), CUT_EVERY):
        yield text[:end]
    yield text


def spans(text: str, rng: random.Random) -> dict[str, str]:
    words = text.split()
    lines = [line for line in text.splitlines() if len(line.strip()) > 10]
    sentence_start = rng.randrange(max(1, len(text) - 80))
    paragraphs = [p for p in text.split("\n\n") if 150 < len(p) < 1500]
    return {
        "word": rng.choice(words) + " ",
        "line": rng.choice(lines) + "\n" if lines else "no line\n",
        "sentence": text[sentence_start: sentence_start + 80],
        "table_row": "| " + " | ".join(rng.sample(words, min(3, len(words)))) + " |\n",
        "paragraph": (rng.choice(paragraphs) + "\n\n") if paragraphs else text[:400],
    }


def measure(ocr_count: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    started = time.perf_counter()
    corpora = {
        "pdf_text_layer": list(pdf_pages(max_pages_per_file=200)),
        "plain_text_docs": list(plain_texts()),
        "tesseract_ocr": list(ocr_pages(ocr_count, seed)),
    }
    real: dict = {}
    false_positives = []
    rule_seconds, rule_calls = 0.0, 0
    for corpus, texts in corpora.items():
        tested = flagged = 0
        for name, text in texts:
            for cut in cuts(text):
                t0 = time.perf_counter()
                loop = repeated_tail(cut)
                rule_seconds += time.perf_counter() - t0
                rule_calls += 1
                tested += 1
                if loop is not None:
                    flagged += 1
                    false_positives.append({"source": name, "at": len(cut), "span": loop.span[:80], "copies": loop.copies, "chars": loop.chars})
        real[corpus] = {"documents": len(texts), "cuts": tested, "flagged": flagged}
    texts = [text for corpus in corpora.values() for _, text in corpus if len(text) > 400]
    synthetic: dict = {}
    for kind in ("word", "line", "sentence", "table_row", "paragraph"):
        for copies in (2, 3, 5, 8, 20, 100):
            caught = total = chars = 0
            for _ in range(200):
                text = rng.choice(texts)
                span = spans(text, rng)[kind]
                prefix = text[: rng.randrange(len(text))]
                cut = rng.randrange(len(span))  # cut by max_tokens inside the last copy
                looped = prefix + span * copies + span[:cut]
                caught += repeated_tail(looped) is not None
                total += 1
                chars += len(span) * copies + cut
            synthetic.setdefault(kind, {})[str(copies)] = {"loops": total, "caught": caught, "loop_chars_mean": chars // total}
    return {
        "real": real,
        "false_positives": false_positives[:50],
        "synthetic": synthetic,
        "rule_ms_mean": round(1000 * rule_seconds / max(1, rule_calls), 4),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ocr_pages", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/loop_rule.json")
    args = parser.parse_args()
    result = measure(args.ocr_pages)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "false_positives"}, indent=2))
    for fp in result["false_positives"][:20]:
        print(fp)


if __name__ == "__main__":
    main()
