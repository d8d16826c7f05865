#!/usr/bin/env bash
# Create .venv with the pinned stack. Idempotent: a second run only re-installs the project.
# Order matters (see README "Install notes"): torch+torchvision first, then sam2 without build
# isolation (its build must see this torch), then the project with a constraint that keeps
# the torch pair from being swapped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
CONSTRAINTS="$VENV/torch-constraints.txt"
printf '%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" > "$CONSTRAINTS"

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_PIN $TORCHVISION_PIN"
  "${PIP[@]}" "$TORCH_PIN" "$TORCHVISION_PIN"
fi
if ! "$VENV/bin/python" -c "import sam2" 2>/dev/null; then
  echo "[setup] installing sam2 (no build isolation, no CUDA extension)"
  SAM2_BUILD_CUDA=0 "${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation "sam2>=1.1"
fi
echo "[setup] installing ttm-ray and its test extra"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import ttm_ray, data_prep, jobs, torch, ray, sam2, decord" \
  || { echo "[setup] FAILED: the environment does not import; see the pip output above" >&2; exit 1; }
# DeepSpeed JIT-builds its CPU comm op (g++, 40-45 s on 2 cores) at the first start of every
# CPU training worker that finds no build: build it once here, into the cache the Makefile,
# the tests and the benchmarks point TORCH_EXTENSIONS_DIR at (ninja makes a rerun a no-op).
# Where DeepSpeed calls the op incompatible (not Linux) it uses plain gloo: nothing to build.
EXT_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
echo "[setup] building DeepSpeed's CPU comm op into $EXT_DIR"
TORCH_EXTENSIONS_DIR=$EXT_DIR DS_ACCELERATOR=cpu \
  "$VENV/bin/python" -c "
from deepspeed.comm.torch import build_shm_op
if build_shm_op() is None:
    print('[setup] DeepSpeed calls its CPU comm op incompatible here: training uses gloo')" \
  || { echo "[setup] FAILED: DeepSpeed's CPU comm op did not build (it needs g++: install" \
            "build-essential or set CXX), and CPU training would build it at its start" >&2
       exit 1; }
echo "[setup] ok: $VENV"
