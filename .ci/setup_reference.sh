#!/usr/bin/env bash
# Create the reference virtualenv: llm-compressor 0.14.0.1 (model_free_ptq), which pins
# compressed-tensors 0.19.0 and transformers <= 5.17 and so cannot live in streamer's venv.
#
#   .ci/setup_reference.sh            -> $STREAMER_REF_VENV (default <repo>/.venv-ref)
#
# Installs exactly .ci/lock/reference.txt (refresh: bash .ci/lock/refresh.sh).
# Idempotent: does nothing when the venv already holds the locked versions.
# Honours the usual pip configuration (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
# pip.conf).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STREAMER_REF_VENV:-$REPO/.venv-ref}"
PY="${PYTHON:-python3}"
LOCK="$REPO/.ci/lock/reference.txt"

check() {
    "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import llmcompressor, compressed_tensors
from llmcompressor import model_free_ptq  # noqa: F401
assert llmcompressor.__version__.startswith("0.14.0"), llmcompressor.__version__
PY
}

locked() {  # the venv holds every locked version
    [ "$("$VENV/bin/python" -m pip freeze --all 2>/dev/null | grep -v -E '^(pip|setuptools|wheel)==' \
         | sed -E 's/^(torch==[^+]+)\+cpu$/\1/' | sort -f)" \
      = "$(grep -v '^#' "$LOCK" | sort -f)" ]
}

if [ -x "$VENV/bin/python" ] && check && locked; then
    echo "reference venv ready: $VENV"
    exit 0
fi

# a half-built venv from an interrupted run: pip install below completes it
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet -r "$LOCK"

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
