#!/usr/bin/env bash
# One-shot check of fastdiff on a GPU machine (no network needed): build the CUDA kernel, run the test
# suite (CUDA tests included), run `fastdiff bench --full`, optionally profile the step kernel with ncu.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, in the environment that has torch
#
# Everything lands in ${OUT:-benchmarks/results}/<device>-<date>/:
#   build.log  tests.log  nvidia-smi.txt  bench.log  results.json  results.md  *.png  [ncu.txt ncu.log]
# Knobs (environment): OUT, BENCH_BUDGET_S (seconds for `bench --full`, default 360; 0 = no limit),
# BENCH_MODE (full | quick, default full), BENCH_ONLY (a `bench --only` regex, e.g. '^(?!(peers|e2e):compile)'
# to leave out the max-autotune compiles), TESTS (pytest paths, default tests), TESTS_TIMEOUT_S (default 600),
# SKIP_TESTS=1, SKIP_BENCH=1, SKIP_NCU=1, PYTHON (default: python3), FASTDIFF_CUDA_ARCH_LIST (default: this GPU's).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device; this script is for a GPU machine" >&2
  exit 1
fi
DEVICE=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')
DIR="${OUT:-benchmarks/results}/${DEVICE}-$(date +%F)"
export FASTDIFF_CUDA_ARCH_LIST=${FASTDIFF_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
mkdir -p "$DIR"
echo "gpu_check: results in $DIR"
status=0

# 1. Build (CPU + CUDA kernels) in place with the installed torch; no pip (an old pip's editable install falls back
#    to an isolated build that needs the network), so the repository root goes on PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
build() {
  nvcc --version 2>&1 || echo "nvcc not on PATH (setup.py also looks in CUDA_HOME and /usr/local/cuda)"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "C++ compiler: ${CXX:-c++} ($(command -v "${CXX:-c++}"))"
  rm -rf build
  MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py build_ext --inplace
}
# An error raised inside the extension must come back as a RuntimeError. On the H200 image of 2026-12-04 the default
# compiler ($CXX=/opt/gcc/bin/g++) linked parts of a static libstdc++ into _C.so (std::ostream code sat in _C.so),
# and the extension crashed (SIGSEGV) formatting any such message; naming the shared runtime at link time is the
# fallback.
raises_cleanly() {
  "$PY" -c 'import torch, fastdiff.ops, sys
x = torch.zeros(2, 3)
try:
    torch.ops.fastdiff.reverse_step(x, x, torch.zeros(1, dtype=torch.long), 0, 1., 0., 1., 1., 0., 0., 1.)
except RuntimeError as e:
    sys.exit(0 if "seeds" in str(e) else 1)
sys.exit(1)' > /dev/null 2>&1
}
build > "$DIR/build.log" 2>&1 || { echo "gpu_check: build failed, see $DIR/build.log" >&2; exit 1; }
if ! raises_cleanly; then
  echo "gpu_check: the extension built with $(command -v "${CXX:-c++}") crashes on its own error messages;" \
    "rebuilding with FASTDIFF_SHARED_LIBSTDCXX=1" | tee -a "$DIR/build.log"
  FASTDIFF_SHARED_LIBSTDCXX=1 build >> "$DIR/build.log" 2>&1 || { echo "gpu_check: build failed, see $DIR/build.log" >&2; exit 1; }
fi
raises_cleanly || { echo "gpu_check: the extension crashes when it raises an error (see build.log); set CXX to another compiler" >&2; status=1; }
"$PY" - > "$DIR/backend.txt" 2>&1 <<'PYEOF'
import torch
from fastdiff import ops
x = torch.zeros(2, 8, device="cuda")
ops.reverse_step(x, x, torch.arange(2, device="cuda"), 1, (1, 0, 1, 1, 0, 0, 1))
print("step backend:", ops.backend(), "(CUDA kernel ran)")
PYEOF
cat "$DIR/backend.txt"
grep -q "extension" "$DIR/backend.txt" || { echo "gpu_check: the CUDA kernel is not in use" >&2; status=1; }

# 2. The machine, for the record.
{
  nvidia-smi
  nvidia-smi -q | grep -E -i "Product Name|Driver Version|CUDA Version|Memory Clock|Max Clocks|Graphics|SM  |Memory  |Power Limit|Persistence Mode|MIG Mode|Current  " | head -60
} > "$DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$DIR/nvidia-smi.txt"

# 3. Tests (CUDA-only tests run here: graph capture/replay, CPU == GPU noise and steps, ...).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  timeout "${TESTS_TIMEOUT_S:-600}" "$PY" -m pytest -q ${TESTS:-tests} -p no:cacheprovider -rs > "$DIR/tests.log" 2>&1
  rc=$?
  tail -n 5 "$DIR/tests.log"
  [ $rc -eq 0 ] || { echo "gpu_check: tests failed (rc $rc), see $DIR/tests.log" >&2; status=1; }
fi

# 4. Benchmarks (results.json is rewritten after each section, so a time-out keeps what was measured).
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  only=(); [ -n "${BENCH_ONLY:-}" ] && only=(--only "$BENCH_ONLY")
  "$PY" -m fastdiff bench --"${BENCH_MODE:-full}" --device cuda --out "$DIR" \
    --time-budget "${BENCH_BUDGET_S:-360}" "${only[@]}" > "$DIR/bench.log" 2>&1
  rc=$?
  tail -n 8 "$DIR/bench.log"
  [ $rc -eq 0 ] || { echo "gpu_check: bench failed (rc $rc), see $DIR/bench.log" >&2; status=1; }
fi

# 5. Optional: Nsight Compute profile of the fused step kernel (16M fp32 elements).
if [ "${SKIP_NCU:-0}" != 1 ] && command -v ncu > /dev/null; then
  cat > "$DIR/ncu_step.py" <<'PYEOF'
import torch
from fastdiff import bench, ops
case = bench.step_case("fused", 16 * bench.MIB, "fp32", "cuda")
for _ in range(3):
    case.fn()
torch.cuda.synchronize()
PYEOF
  timeout "${NCU_TIMEOUT_S:-300}" ncu --target-processes all -k regex:step_ --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    "$PY" "$DIR/ncu_step.py" > "$DIR/ncu.txt" 2> "$DIR/ncu.log" || echo "gpu_check: ncu failed (see $DIR/ncu.log)"
else
  echo "gpu_check: ncu not found (or SKIP_NCU=1): no kernel profile"
fi
echo "gpu_check: done (status $status) -> $DIR"
exit $status
