#!/usr/bin/env bash
# Set up .venv and the Debian packages the tests use (Tesseract, fonts, Chromium) if
# needed, then run the whole test suite (real vLLM engine on
# CPU, real Beam runner, real Parquet). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_system.sh
exec .venv/bin/python -m pytest "$@"
