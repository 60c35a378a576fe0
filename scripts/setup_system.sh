#!/usr/bin/env bash
# Installs the Debian packages the pipeline, the evaluation and the tests use:
# Tesseract (an OCR baseline) with its English model and its orientation model
# (osd: --upright_pages turns pages upright with it), DejaVu fonts (render-text
# references and test PDFs), Chromium (renders the run report headless),
# Debian's R manuals (r-doc-pdf: real born-digital PDFs the text-layer and
# page-check tests and benchmarks derive their pages from), qpdf (rewrites one
# uncompressed to derive hard cases) and poppler-utils (pdftotext, an
# independent text extraction).
# Idempotent and quiet when nothing is missing: apt is not
# touched at all then (no `apt-get update`, which is slow and needs the
# network), so scripts/test.sh can call it unconditionally.
set -euo pipefail

PACKAGES=(tesseract-ocr tesseract-ocr-eng tesseract-ocr-osd fonts-dejavu-core chromium r-doc-pdf qpdf poppler-utils)

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  SUDO=(sudo)
fi
echo "[setup-system] installing ${missing[*]}" >&2
"${SUDO[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[setup-system] done" >&2
