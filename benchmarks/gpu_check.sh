#!/usr/bin/env bash
# The whole GPU check of issue #20 in one command, for a GPU machine with no network (meant to end within
# 8 minutes on an H200; the stages' time limits add up to 8):
#   1. install  the peers (Liger-Kernel, Cut Cross-Entropy) and, where missing, pytest/hypothesis, from
#               the wheels in benchmarks/wheels/ (filled by benchmarks/gpu_wheels.sh where PyPI is
#               reachable); a wheel that is absent is skipped, and its peer is listed as not installed
#   2. env      nvidia-smi and the versions of python, torch, triton, transformers, the peers
#   3. bench    benchmarks/bench_gpu.py --repeats 5      (the fused head against the peers)
#   4. train    benchmarks/bench_gpu_train.py --repeats 5 (a ~1B Llama's training step, each loss patched in)
#   5. profile  benchmarks/profile_gpu.py: SMILE's kernels and its host side (where the next work is)
#   6. tests    the CUDA tests against the dense spec (TRITON_INTERPRET=0)
# Everything goes to ${OUT:-gpu_check_out}: env.txt, pytest.log, bench.log, bench_gpu.md, bench_gpu_train.md,
# profile.txt, summary.txt. Every stage runs under its own timeout; a failing stage does not stop the next ones, and
# the exit status is 1 if any failed.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, carrying benchmarks/wheels
#   bash benchmarks/gpu_check.sh --tiny     # (or GPU_CHECK_TINY=1) the same on CPU: Triton's interpreter,
#                                           # tiny shapes, a quick test selection (this script's own test)
# Environment: PYTHON (default .venv/bin/python if present, else python3), OUT, GPU_CHECK_STAGES (a
# comma-separated subset of install,env,tests,bench,train,profile), GPU_CHECK_SITE (where wheels install,
# default /tmp/seqloss_gpu_site), GPU_CHECK_TIMEOUT_<STAGE> in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/benchmarks/gpu_check.sh
TINY=${GPU_CHECK_TINY:-0}
RUN_STAGE=""
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) TINY=1 ;;
    --stage) RUN_STAGE=$2; shift ;;  # internal: one stage, run by `timeout` in a process of its own
    -h|--help) sed -n '2,20p' "$SELF"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SITE=${GPU_CHECK_SITE:-/tmp/seqloss_gpu_site}
STAGES=${GPU_CHECK_STAGES:-install,env,tests,bench,train,profile}
WHEELS=$ROOT/benchmarks/wheels
export GPU_CHECK_TINY=$TINY PYTHON OUT GPU_CHECK_SITE=$SITE PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ "$TINY" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--shape tiny --device cpu --repeats 1)
  PROFILE_ARGS=(--shape tiny --device cpu --rows 5)
  TESTS=(tests/kernels/test_cuda.py -k "design or (interpreted and logits and fp32 and not stats)")
  DEFAULT_TIMEOUT=120
else
  export TRITON_INTERPRET=0
  BENCH_ARGS=(--repeats 5)
  PROFILE_ARGS=(--shape llama3-8b --rows 25)
  TESTS=(tests/kernels/test_cuda.py tests/kernels/test_cuda_autocast_compile.py
         tests/hf/test_patching.py::test_labels_on_another_device_follow_the_logits)
  DEFAULT_TIMEOUT=0  # each stage's own, below
fi

# --- the stages (each runs as `gpu_check.sh --stage NAME`: `timeout` ends its whole process group) ---

stage_env() {
  { command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"; } 2>&1
  "$PYTHON" - <<'PYTHON_EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "pytest", "hypothesis",
             "pytest-xdist", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
import torch
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PYTHON_EOF
}

stage_install() {  # each module that is missing, from its wheels, into $SITE (on PYTHONPATH)
  local chosen=() entries=() entry module globs g wheel found
  mkdir -p "$SITE"
  if [ "$TINY" = 1 ]; then  # Cut Cross-Entropy's kernels fail under Triton's interpreter: peers stay out
    echo "peers: not installed by --tiny"
  else
    entries=("liger_kernel:liger_kernel-" "cut_cross_entropy:cut_cross_entropy-")
  fi
  entries+=("pytest:pytest- pluggy- iniconfig-" "hypothesis:hypothesis- sortedcontainers- attrs-"
           "xdist:pytest_xdist- execnet-" "pytest_timeout:pytest_timeout-")
  for entry in "${entries[@]}"; do
    module=${entry%%:*}; globs=${entry#*:}
    if "$PYTHON" -c "import $module" 2>/dev/null; then echo "$module: already importable"; continue; fi
    found=0
    for g in $globs; do
      for wheel in "$WHEELS"/$g[0-9]*.whl; do
        if [ -e "$wheel" ]; then chosen+=("$wheel"); found=1; fi
      done
    done
    if [ $found = 1 ]; then echo "$module: from wheels"; else echo "$module: no wheel in benchmarks/wheels, skipped"; fi
  done
  [ ${#chosen[@]} = 0 ] && return 0
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${chosen[@]}"
}

stage_tests() {
  local options=(-q)
  if [ "$TINY" != 1 ]; then
    options=(-v)  # a line per test: a stage ended by its timeout still shows how far it got
    # Compiling the kernels' variants dominates: four processes compile side by side.
    if "$PYTHON" -c "import xdist" 2>/dev/null; then options+=(-n 4); fi
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then options+=(--timeout 150); fi
  fi
  "$PYTHON" -m pytest -rfE -p no:cacheprovider "${options[@]}" "${TESTS[@]}"
}

stage_bench() {
  local extra=()
  [ "$TINY" = 1 ] && extra=(--logits-shape tiny)
  "$PYTHON" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" "${extra[@]}" --markdown "$OUT/bench_gpu.md"
}

stage_train() {
  "$PYTHON" benchmarks/bench_gpu_train.py "${BENCH_ARGS[@]}" --markdown "$OUT/bench_gpu_train.md"
}

stage_profile() {
  "$PYTHON" benchmarks/profile_gpu.py "${PROFILE_ARGS[@]}" --profile "smile/seqloss triton" \
    --cprofile "smile/seqloss triton"
}

if [ -n "$RUN_STAGE" ]; then
  case $RUN_STAGE in env|install|tests|bench|train|profile) "stage_$RUN_STAGE"; exit $? ;; esac
  echo "gpu_check.sh: unknown stage $RUN_STAGE" >&2; exit 2
fi

# --- the driver --------------------------------------------------------------------------------------

: > "$OUT/summary.txt"
FAILED=0

timeout_of() {  # stage default -> seconds
  local name="GPU_CHECK_TIMEOUT_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
  if [ -n "${!name:-}" ]; then echo "${!name}"; elif [ "$DEFAULT_TIMEOUT" != 0 ]; then echo "$DEFAULT_TIMEOUT"; else echo "$2"; fi
}

stage() {  # stage NAME DEFAULT_SECONDS LOG: run it under its timeout, its output appended to LOG
  local name=$1 seconds log=$3 start rc status
  seconds=$(timeout_of "$1" "$2")
  case ",$STAGES," in *",$name,"*) ;; *) echo "$name: not asked for" >> "$OUT/summary.txt"; return ;; esac
  echo "== $name (timeout ${seconds}s)" | tee -a "$log"
  start=$(date +%s)
  timeout -k 10 "$seconds" bash "$SELF" --stage "$name" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMED OUT after ${seconds}s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  echo "$name: $status in $(( $(date +%s) - start ))s (log: $(basename "$log"))" | tee -a "$OUT/summary.txt"
  [ "$status" = ok ] || tail -n 30 "$log"
}

rm -f "$OUT"/env.txt "$OUT"/pytest.log "$OUT"/bench.log "$OUT"/bench_gpu.md "$OUT"/bench_gpu_train.md "$OUT"/profile.txt
# Worst case under 8 minutes (every stage at its limit); on an H200 about 4. The figures first: a
# session whose device time runs out mid-way still brings the tables back.
stage install 20 "$OUT/env.txt"
stage env 20 "$OUT/env.txt"
stage bench 120 "$OUT/bench.log"
stage train 80 "$OUT/bench.log"
stage profile 60 "$OUT/profile.txt"
stage tests 180 "$OUT/pytest.log"

for table in bench_gpu bench_gpu_train; do [ -f "$OUT/$table.md" ] && { echo; cat "$OUT/$table.md"; }; done
grep -E "passed|failed|error" "$OUT/pytest.log" 2>/dev/null | tail -n 1
echo; cat "$OUT/summary.txt"
exit $FAILED
