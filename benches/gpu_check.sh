#!/usr/bin/env bash
# make gpu-check: on a machine with a CUDA GPU (torch and triton already installed), build airtrace into that Python,
# run the GPU tests, the self-check and the GPU rows of bench_ops, then the end-to-end figures (a ~1B-parameter model:
# featurize overhead, fit, score; a 10^7-row store streamed to the GPU), each step under a hard timeout, and write
# every log and result under benches/results/<gpu>/; a summary of each step's exit status comes last.
#
#   make gpu-check                       # PYTHON=python3 by default; at most 580 s of step timeouts in all
#   make gpu-check WHEELS=/path/wheels   # install missing build/test packages from local wheels (offline machine)
#   GPU_CHECK_STEPS="tests bench" make gpu-check   # only these steps (env and deps always run), e.g. a rerun
#   GPU_CHECK_RESULTS=DIR make gpu-check           # write into DIR/<gpu>/ instead of benches/results/<gpu>/
#   GPU_CHECK_DRY_RUN=1 make gpu-check   # no GPU: the steps a CPU can run, into benches/results/gpu-check-dry-run/
#
# torch, triton and numpy are never installed here: a missing one is an error of the machine. Other missing packages
# (build backend, pytest, ...) are installed without dependencies, from $WHEELS when given.
set -u
cd "$(dirname "$0")/.."

export PY=${PYTHON:-python3}
export WHEELS=${WHEELS:-}
DRY=${GPU_CHECK_DRY_RUN:-0}
STEPS=" ${GPU_CHECK_STEPS:-build tests selfcheck bench e2e score} "
# Seconds per step (overridable from the environment); together 580 s, so one run fits a 10-minute slot. The dry run
# on a shared 2-core CPU gets longer limits for its smoke passes.
T_ENV=${T_ENV:-20} T_DEPS=${T_DEPS:-20} T_BUILD=${T_BUILD:-140} T_TESTS=${T_TESTS:-100}
T_SELFCHECK=${T_SELFCHECK:-40} T_BENCH=${T_BENCH:-110} T_E2E=${T_E2E:-60} T_SCORE=${T_SCORE:-90}
if [ "$DRY" = 1 ]; then T_ENV=60 T_DEPS=60 T_E2E=300 T_SCORE=120; fi
# The cached 10^7 x 256 bf16 store of the score step (5.1 GB in 32 MiB shards).
SCORE_DIR=${SCORE_DIR:-${TMPDIR:-/tmp}/airtrace-gpu-check-store}

if [ "$DRY" = 1 ]; then
  GPU_NAME="gpu-check-dry-run"
else
  GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null) || GPU_NAME=""
  if [ -z "$GPU_NAME" ]; then
    echo "gpu-check: no CUDA GPU visible to $PY (torch.cuda.get_device_name failed); GPU_CHECK_DRY_RUN=1 runs the CPU part" >&2
    exit 2
  fi
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
case $SLUG in gpu-*) ;; *) SLUG="gpu-$SLUG" ;; esac
OUT="${GPU_CHECK_RESULTS:-benches/results}/$SLUG"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: > "$LOG"
SUMMARY=()
FAILED=0
BEGIN=$SECONDS

log() { printf '%s\n' "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run COMMAND (a program, or a function of this script) under a hard timeout, output in
# $OUT/NAME.log, exit status recorded; a step that GPU_CHECK_STEPS leaves out is recorded as skipped.
step() {
  local name=$1 limit=$2
  shift 2
  case $name in env|deps) ;; *)
    if [[ $STEPS != *" $name "* ]]; then
      SUMMARY+=("$(printf '%-10s %-9s' "$name" skipped)")
      return
    fi ;;
  esac
  local start=$SECONDS rc
  log "== $(date -u +%H:%M:%S) $name (timeout ${limit}s): $*"
  if declare -F "$1" > /dev/null; then  # a function of this script (it may call pip_install)
    timeout --kill-after=10 "$limit" bash -c "set -u; $(declare -f pip_install "$1"); $*" > "$OUT/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  local took=$((SECONDS - start)) verdict=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMED OUT"; elif [ "$rc" != 0 ]; then verdict=FAILED; fi
  [ "$verdict" = ok ] || FAILED=$((FAILED + 1))
  tail -n 15 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$LOG"
  log "   -> $name: $verdict (exit $rc, ${took}s)"
  SUMMARY+=("$(printf '%-10s %-9s exit %-3s %4ss  %s' "$name" "$verdict" "$rc" "$took" "$OUT/$name.log")")
}

env_report() {
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  command -v nvcc > /dev/null && nvcc --version || echo "nvcc: not found (the cuda backend needs it to build)"
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "numpy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING:", exc)
import torch
print("cuda available:", torch.cuda.is_available(), "| torch built for CUDA", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
}

# pip install into $PY; a Python whose packages the system manages (PEP 668) needs --break-system-packages.
pip_install() {
  "$PY" -m pip install --disable-pip-version-check "$@" && return 0
  "$PY" -m pip install --help | grep -q -- --break-system-packages || return 1
  echo "retrying with --break-system-packages"
  "$PY" -m pip install --disable-pip-version-check --break-system-packages "$@"
}

# Missing pure build/test packages, installed without their dependencies (never torch, triton or numpy).
deps() {
  "$PY" -c 'import torch, triton, numpy' || { echo "torch, triton and numpy must be preinstalled"; return 1; }
  local missing=()
  local module req
  for module in scikit_build_core pathspec packaging pybind11 ninja cmake safetensors tqdm pytest pluggy iniconfig; do
    req=$(grep -iE "^${module}==" requirements.lock || echo "$module")
    "$PY" -c "import $module" 2> /dev/null || missing+=("$req")
  done
  echo "missing: ${missing[*]:-none}"
  [ ${#missing[@]} = 0 ] && return 0
  if [ -n "$WHEELS" ]; then
    pip_install --no-deps --no-index --find-links "$WHEELS" "${missing[@]}"
  else
    pip_install --no-deps "${missing[@]}"
  fi
}

# The build make setup does, into this Python, with the CUDA extension required (and for this GPU's architecture only,
# to save time); without nvcc it falls back to the CPU + Triton build so that the other steps still run, and fails.
build() {
  local arch
  arch=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(f"{a}{b}")')
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  if pip_install --no-deps --no-build-isolation . -Ccmake.define.AIRTRACE_CUDA=ON \
       -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -Cbuild-dir=build/gpu-check; then
    "$PY" -c 'import airtrace._C_cuda; import airtrace; print("airtrace", airtrace.__file__)'
    return
  fi
  echo "the CUDA build failed; building without the cuda backend so that Triton can still be checked"
  pip_install --no-deps --no-build-isolation . -Cbuild-dir=build/gpu-check-nocuda
  return 1
}

log "gpu-check: $GPU_NAME -> $OUT (python: $PY, dry run: $DRY)"
step env "$T_ENV" env_report
step deps "$T_DEPS" deps
if [ "$DRY" = 1 ]; then
  # The CPU part: the installed package (make setup), the GPU tests collected (and skipped), the self-check on the
  # CPU backends, quick CPU smoke passes of the benches (bench_ops without --check: tiny shapes on a shared CPU are no
  # measurement).
  step tests "$T_TESTS" "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider
  step selfcheck "$T_SELFCHECK" "$PY" -m airtrace selfcheck --quick --repeats 1
  step bench "$T_BENCH" "$PY" benches/bench_ops.py --device cpu --quick --only precondition,pool --out "$OUT"
  step e2e "$T_E2E" "$PY" benches/bench_gpu_e2e.py --device cpu --quick --layers 1 --width 256 --vocab 512 \
    --out "$OUT"
  step score "$T_SCORE" "$PY" benches/bench_score_large.py --device cpu --quick --queries 64 --check --dir "$SCORE_DIR" \
    --out "$OUT"
else
  step build "$T_BUILD" build
  export TRITON_INTERPRET=0  # compiled Triton on the GPU (the test suite's default is the CPU interpreter)
  step tests "$T_TESTS" "$PY" -m pytest -m gpu tests/test_gpu.py -v -rfEs -p no:cacheprovider \
    --junitxml="$OUT/pytest-gpu.xml"
  step selfcheck "$T_SELFCHECK" "$PY" -m airtrace selfcheck --repeats 5
  step bench "$T_BENCH" "$PY" benches/bench_ops.py --device cuda --min-seconds 0.2 --check --out "$OUT"
  # ~1B parameters (20 blocks, d 2048), 128 sequences of 512 tokens: featurize overhead over forward + backward, fit,
  # score; then a 10^7-row store (width 256, 64 queries) streamed through pinned buffers: rows/s vs file read and
  # host -> GPU copy rates.
  step e2e "$T_E2E" "$PY" benches/bench_gpu_e2e.py --examples 128 --check --out "$OUT"
  step score "$T_SCORE" "$PY" benches/bench_score_large.py --device cuda --rows 10000000 --width 256 --queries 64 \
    --rows-per-shard 65536 --repeats 1 --check --dir "$SCORE_DIR" --out "$OUT"
fi

log ""
log "== summary ($GPU_NAME, $(date -u), $((SECONDS - BEGIN)) s): $FAILED step(s) failed or timed out"
for line in "${SUMMARY[@]}"; do log "$line"; done
[ "$FAILED" = 0 ]
