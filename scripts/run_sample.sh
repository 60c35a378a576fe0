#!/usr/bin/env bash
# Quick start: set up .venv if needed, then run the pipeline on the bundled
# samples (data/samples/: PNG, EXIF-rotated JPEG, WebP, 2-page TIFF, 3-page PDF)
# with the tiny random-weight Gemma 4 checkpoint on the local runner.
# Extra arguments are passed to the pipeline (e.g. --tasks ocr). Each call
# replaces the previous sample run in $OUT (--replace_output): it is a demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT="${OUT:-out/sample}"
exec .venv/bin/python -m pipelines.vision_batch --input data/samples --output "$OUT" --replace_output "$@"
