#!/usr/bin/env bash
# The project's GPU checks, in one script: what the CPU test env cannot run, in at most 8
# minutes on one H100. Writes benchmarks/results/gpu_<date>.md (each check's command, status,
# seconds and output, and a summary table).
#
#   bash benchmarks/gpu_check.sh              # run every check (needs an NVIDIA GPU)
#   bash benchmarks/gpu_check.sh --dry-run    # list the checks and their commands (any box)
#   bash benchmarks/gpu_check.sh --only flex --only dit_mfu [--no-install] [--out FILE]
#   bash benchmarks/gpu_check.sh --cpu-smoke  # every check at its tiny CPU size, no GPU
#                                             # needed: tests this script (report in a temp dir)
#
# Checks, in this order (each Python one lives in benchmarks/gpu/, has --help and a tiny
# --cpu-smoke mode, prints a table and then one JSON line):
#   flex          masked_attention(backend="flex") forward + backward against the float64
#                 reference at the dit-4b (4,096 tokens, 20 heads x 128) and U-Net level-0
#                 (65,536 tokens, 8 heads x 40; reference on 1,024 query rows) sizes
#   dit_mfu       bf16 training steps of a 4-block dit-4b-wide DiT, DeepSpeed ZeRO-2 + activation
#                 checkpointing, world size 1 (nccl): TFLOP/s, MFU of the measured matmul peak
#   sam2_fps      SAM2.1 hiera-tiny / hiera-large video propagation FPS at 1024 px (random
#                 weights) against the SAM2 README's A100 figures
#   pytest_gpu    the tests marked gpu (the files grep finds the marker in)
#   vllm_caption  OPTIONAL: 4 clips through both vLLM engine paths; "skipped: vllm not
#                 importable" where the gpu extra is absent, which is not a failure
#
# Exit status: 0  every required check ran and passed (vllm_caption passed or was skipped);
#              1  a check failed, timed out, or could not run (e.g. a package missing);
#              2  no NVIDIA GPU here: nothing was run (never with --dry-run);
#              64 bad arguments.
# Time: each check runs under `timeout` with its own limit (LIMIT below), cut to what is left
# of TTM_GPU_CHECK_BUDGET_S (480 s) for the whole script; a failing check does not stop the
# others. A fresh copy of the tree first installs what is missing (benchmarks/gpu/setup_env.sh,
# at most TTM_GPU_CHECK_INSTALL_S = 180 s, out of the same budget; --no-install skips it).
# Environment: PYTHON (default .venv/bin/python, else python3), TTM_GPU_CHECK_VLM (the VLM
# folder vllm_caption serves; default a tiny random LLaVA), TTM_GPU_CHECK_VLLM_PYTHON (an
# interpreter with vllm, e.g. of a separate vLLM venv; default PYTHON).
set -uo pipefail # no -e: a failing check must not stop the others
CALLER=$PWD
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
ARGS="$*"
START=$SECONDS
BUDGET=${TTM_GPU_CHECK_BUDGET_S:-480}
INSTALL_LIMIT=${TTM_GPU_CHECK_INSTALL_S:-180}
DATE=$(date +%F)
OUT=benchmarks/results/gpu_$DATE.md
DRY_RUN=0
SMOKE=0
OUT_GIVEN=0
INSTALL=1
ONLY=()

CHECKS=(flex dit_mfu sam2_fps pytest_gpu vllm_caption)
# Seconds per check (sum 470 of the 480 budget): estimates for one H100 with headroom for
# torch.compile and engine start-up, not yet measured there; a run prints what each took.
declare -A LIMIT=([flex]=110 [dit_mfu]=80 [sam2_fps]=70 [pytest_gpu]=100 [vllm_caption]=110)
declare -A OPTIONAL=([vllm_caption]=1)
declare -A STATUS=() NOTE=() SECS=() CMDS=() APPLIED=()

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --cpu-smoke) SMOKE=1 ;;
    --no-install) INSTALL=0 ;;
    --only) shift; ONLY+=("${1:-}") ;;
    --out) shift; OUT=${1:-$OUT} OUT_GIVEN=1; [[ $OUT = /* ]] || OUT="$CALLER/$OUT" ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
  shift
done
if [ ${#ONLY[@]} -gt 0 ]; then
  for name in "${ONLY[@]}"; do
    [ -n "$name" ] && [ -n "${LIMIT[$name]:-}" ] || { echo "gpu_check: --only '$name' is not a check;" \
      "checks: ${CHECKS[*]}" >&2; exit 64; }
  done
  CHECKS=("${ONLY[@]}")
fi

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x .venv/bin/python ]; then echo .venv/bin/python
  else echo python3; fi
}
PY=$(pick_python)
VLLM_PY=${TTM_GPU_CHECK_VLLM_PYTHON:-$PY}
# The checks import the tree itself (no install of the project needed for them).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

gpu_test_files() { grep -rlE 'pytest\.mark\.gpu\b' tests --include='*.py' | sort | xargs; }

check_command() { # the shell command of check $1
  local smoke=""
  [ "$SMOKE" = 1 ] && smoke=" --cpu-smoke"
  case $1 in
    flex) echo "$PY benchmarks/gpu/flex_check.py$smoke" ;;
    dit_mfu) echo "$PY benchmarks/gpu/dit_mfu.py$smoke" ;;
    sam2_fps) echo "$PY benchmarks/gpu/sam2_fps.py$smoke" ;;
    pytest_gpu) echo "$PY -m pytest -q -rA -p no:cacheprovider -m gpu $(gpu_test_files)" ;;
    vllm_caption) echo "$VLLM_PY benchmarks/gpu/vllm_caption.py$smoke" ;;
  esac
}

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
IMPORTS="import torch, deepspeed, sam2, hydra, pytest, yaml, ttm_ray.models, data_prep"

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check --dry-run: would run ${#CHECKS[@]} checks, in this order, within ${BUDGET} s:"
  echo "  environment: PYTHON=$PY; if it cannot '$IMPORTS':" \
       "bash benchmarks/gpu/setup_env.sh (timeout ${INSTALL_LIMIT} s; not with --no-install)"
  for name in "${CHECKS[@]}"; do
    kind=required; [ -n "${OPTIONAL[$name]:-}" ] && kind=optional
    printf '  %-13s %-8s timeout %3ss  %s\n' "$name" "$kind" "${LIMIT[$name]}" \
      "$(check_command "$name")"
  done
  echo "  results: $OUT"
  if have_gpu; then echo "  GPU here: $(nvidia-smi -L | head -n 1)"
  else echo "  GPU here: none (a real run would exit 2)"; fi
  exit 0
fi

LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ "$SMOKE" = 1 ]; then
  [ "$OUT_GIVEN" = 1 ] || OUT="$LOGDIR/gpu_cpu_smoke_$DATE.md" # not a GPU result
elif ! have_gpu; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing): run on a GPU node;" \
       "--dry-run lists the checks, --cpu-smoke runs them at tiny CPU sizes" >&2
  rm -rf "$LOGDIR"
  exit 2
else
  export DS_ACCELERATOR=cuda # the Makefile and the tests export cpu
fi

# ------------------------------------------------------------------------- environment
INSTALL_NOTE="not needed: $PY imports the checks' packages"
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
  if [ "$INSTALL" = 1 ]; then
    echo "=== environment: $PY cannot import the checks' packages; installing into .venv" \
         "(timeout ${INSTALL_LIMIT} s)"
    t0=$SECONDS
    timeout -k 10 "$INSTALL_LIMIT" bash benchmarks/gpu/setup_env.sh 2>&1 \
      | tee "$LOGDIR/install.log"
    rc=${PIPESTATUS[0]}
    INSTALL_NOTE="setup_env.sh exit $rc after $((SECONDS - t0)) s (log: see the end of the file)"
    if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
    VLLM_PY=${TTM_GPU_CHECK_VLLM_PYTHON:-$PY}
  else
    INSTALL_NOTE="$PY cannot import the checks' packages; --no-install: not installed"
  fi
fi
echo "=== environment: $INSTALL_NOTE"

# ------------------------------------------------------------------------- the checks
json_summary() { # the "summary" of the last JSON line of log $1
  grep '^{"check"' "$1" | tail -n 1 \
    | "$PY" -c 'import json, sys; print(json.loads(sys.stdin.read())["summary"])' 2>/dev/null
}
pytest_summary() { # pytest's closing line ("6 passed, 1 skipped in 40.2s")
  grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$1" | tail -n 1 | tr -d '='
}

run_check() {
  local name=$1 cmd limit left log rc t0
  cmd=$(check_command "$name")
  CMDS[$name]=$cmd
  left=$((BUDGET - (SECONDS - START)))
  limit=${LIMIT[$name]}
  [ "$left" -lt "$limit" ] && limit=$left
  APPLIED[$name]=$limit
  if [ "$limit" -lt 10 ]; then
    STATUS[$name]=failed SECS[$name]=0
    NOTE[$name]="not run: the ${BUDGET} s budget is spent"
    return
  fi
  log="$LOGDIR/$name.log"
  echo "=== $name (timeout ${limit} s): $cmd"
  t0=$SECONDS
  timeout -k 15 "$limit" bash -c "$cmd" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  SECS[$name]=$((SECONDS - t0))
  if [ "$name" = pytest_gpu ]; then NOTE[$name]=$(pytest_summary "$log")
  else NOTE[$name]=$(json_summary "$log"); fi
  case $rc in
    0) STATUS[$name]=passed ;;
    3) if [ -n "${OPTIONAL[$name]:-}" ]; then STATUS[$name]=skipped
       else STATUS[$name]=failed NOTE[$name]="did not run: ${NOTE[$name]}"; fi ;;
    124 | 137) STATUS[$name]=failed NOTE[$name]="timed out after ${limit} s; ${NOTE[$name]}" ;;
    *) STATUS[$name]=failed NOTE[$name]="exit $rc; ${NOTE[$name]:-see its output}" ;;
  esac
  echo "=== $name: ${STATUS[$name]} in ${SECS[$name]} s"
}

for name in "${CHECKS[@]}"; do run_check "$name"; done

# ------------------------------------------------------------------------- report
EXIT=0
for name in "${CHECKS[@]}"; do [ "${STATUS[$name]}" = failed ] && EXIT=1; done
case $EXIT in
  0) MEANING="every required check ran and passed" ;;
  *) MEANING="a check failed, timed out or could not run" ;;
esac
summary_table() {
  echo "| check | status | seconds | timeout s | result |"
  echo "|---|---|---|---|---|"
  for name in "${CHECKS[@]}"; do
    echo "| $name | ${STATUS[$name]} | ${SECS[$name]} | ${APPLIED[$name]} |" \
         "$(echo "${NOTE[$name]:-}" | tr '|' '/' | tr -d '\n') |"
  done
}
machine() {
  local gpu
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null | head -n 1)
  echo "${gpu:-none}"
}
mkdir -p "$(dirname "$OUT")"
{
  echo "# GPU check, $DATE$([ "$SMOKE" = 1 ] && echo " (--cpu-smoke: tiny CPU sizes, not GPU results)")"
  echo
  echo "Command: \`bash benchmarks/gpu_check.sh${ARGS:+ $ARGS}\` at commit" \
       "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
       "($(git status --porcelain 2>/dev/null | grep -c . || true) files changed)."
  echo "GPU: $(machine); $(nproc) CPU cores; Python \`$PY\`" \
       "($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "no torch"))."
  echo "Environment: $INSTALL_NOTE. Wall time: $((SECONDS - START)) s of the ${BUDGET} s budget."
  echo
  echo "## Summary"
  echo
  summary_table
  echo
  echo "Exit status $EXIT: $MEANING (0: all passed, vllm_caption may be skipped; 1: a failure;" \
       "2: no GPU)."
  for name in "${CHECKS[@]}"; do
    echo
    echo "## $name"
    echo
    echo "Command: \`${CMDS[$name]:-$(check_command "$name")}\`; ${STATUS[$name]} in" \
         "${SECS[$name]} s (timeout ${APPLIED[$name]} s)."
    if [ -f "$LOGDIR/$name.log" ]; then
      echo
      echo '```text'
      tail -n 400 "$LOGDIR/$name.log"
      echo '```'
    fi
  done
  if [ -f "$LOGDIR/install.log" ]; then
    printf '\n## environment install\n\n```text\n%s\n```\n' "$(tail -n 100 "$LOGDIR/install.log")"
  fi
} > "$OUT"

echo
summary_table
echo "gpu_check: exit $EXIT ($MEANING); results in $OUT (logs in $LOGDIR)"
exit "$EXIT"
