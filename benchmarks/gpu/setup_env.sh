#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs, into .venv, on a GPU machine with a fresh copy of the
# tree: the torch pair of scripts/setup.sh (only where no CUDA-enabled torch imports), sam2
# (no build isolation), the project (editable, no extras) and pytest. gpu_check.sh runs this
# under `timeout` only when its Python cannot import the checks' packages.
#
# The venv sees the system site-packages, so a GPU image's preinstalled CUDA torch is reused
# instead of downloaded. vLLM is NOT installed (it pins its own torch: give gpu_check.sh a
# separate interpreter with TTM_GPU_CHECK_VLLM_PYTHON instead).
# Exit 0: installed and importable; 1: no package registry reachable or an install failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
BOOT=${PYTHON_BOOTSTRAP:-python3.11}
command -v "$BOOT" >/dev/null 2>&1 || BOOT=python3
# The pins of scripts/setup.sh, read from it so the two never drift.
TORCH_PIN=$(sed -n 's/^TORCH_PIN="\(.*\)"$/\1/p' scripts/setup.sh)
TORCHVISION_PIN=$(sed -n 's/^TORCHVISION_PIN="\(.*\)"$/\1/p' scripts/setup.sh)
log() { echo "[setup_env] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV ($($BOOT --version)), with the system site-packages"
  "$BOOT" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check --timeout 20 --retries 1)
if ! timeout 30 "$PY" -m pip index versions pip --timeout 10 --retries 0 >/dev/null 2>&1; then
  log "FAILED: no package registry reachable from here (pip index versions pip); install" \
      "the project's environment by other means and pass PYTHON=/path/to/python" >&2
  exit 1
fi
CONSTRAINTS="$VENV/gpu-check-constraints.txt"
if "$PY" -c "import torch, torchvision; assert torch.cuda.is_available()" 2>/dev/null; then
  # Keep the torch that works here (the image's own): pin it for everything that follows.
  "$PY" -c "import torch, torchvision; print(f'torch=={torch.__version__.split(\"+\")[0]}');
print(f'torchvision=={torchvision.__version__.split(\"+\")[0]}')" > "$CONSTRAINTS"
  log "reusing $(tr '\n' ' ' < "$CONSTRAINTS")"
else
  log "installing $TORCH_PIN $TORCHVISION_PIN"
  "${PIP[@]}" "$TORCH_PIN" "$TORCHVISION_PIN"
  printf '%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" > "$CONSTRAINTS"
fi
if ! "$PY" -c "import sam2" 2>/dev/null; then
  log "installing sam2 (no build isolation, no CUDA extension)"
  SAM2_BUILD_CUDA=0 "${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation "sam2>=1.1"
fi
log "installing ttm-ray (editable) and pytest"
"${PIP[@]}" -c "$CONSTRAINTS" -e . "pytest>=8" "pytest-timeout>=2.3"
"$PY" -c "import torch, deepspeed, sam2, hydra, pytest, ttm_ray.models, data_prep" \
  || { log "FAILED: the environment does not import; see the pip output above" >&2; exit 1; }
log "ok: $VENV"
