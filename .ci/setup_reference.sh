#!/usr/bin/env bash
# Create the reference virtualenv: llm-compressor 0.14.0.1 (model_free_ptq), which pins
# compressed-tensors 0.19.0 and transformers <= 5.17 and so cannot live in streamer's venv.
#
#   .ci/setup_reference.sh            -> $STREAMER_REF_VENV (default <repo>/.venv-ref)
#
# Idempotent: does nothing when the venv already imports llmcompressor 0.14.0.1.
# Honours the usual pip configuration (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
# pip.conf).  STREAMER_REF_TORCH overrides the torch requirement (default torch==2.13.0);
# on a CPU-only CI set e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid
# the CUDA wheels.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STREAMER_REF_VENV:-$REPO/.venv-ref}"
PY="${PYTHON:-python3}"
TORCH_REQ="${STREAMER_REF_TORCH:-torch==2.13.0}"
LLMC_REQ="llmcompressor==0.14.0.1"

check() {
    "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import llmcompressor, compressed_tensors
from llmcompressor import model_free_ptq  # noqa: F401
assert llmcompressor.__version__.startswith("0.14.0"), llmcompressor.__version__
PY
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "reference venv ready: $VENV"
    exit 0
fi

# a half-built venv from an interrupted run: pip install below completes it
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "$TORCH_REQ" "$LLMC_REQ"

if ! check; then
    echo "reference venv at $VENV does not import llmcompressor after install" >&2
    exit 1
fi
"$VENV/bin/python" - <<'PY'
import compressed_tensors, llmcompressor, torch, transformers
print(f"reference venv ready: llmcompressor {llmcompressor.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
PY
