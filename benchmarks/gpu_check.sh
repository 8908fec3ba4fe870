#!/usr/bin/env bash
# The one prepared command for a session with a lent NVIDIA GPU (no Triton interpreter: real compilation).
#   bash benchmarks/gpu_check.sh
# 1. prints the GPU and the versions; 2. runs the kernel tests compiled for the GPU; 3. runs the kernel
# benchmark at full shapes (benchmarks/results/kernels-<gpu name>.csv/.png); 4. runs
# benchmarks/random_ltd_step.py when it exists. Each step has its own time limit (455 s together), so the
# script ends within 8 minutes on an H100 even if a step hangs; expected total about 4 minutes. When $OUT is
# set (the device tool), the log and the new result files are copied there (at most 8 files come back).
# Exit status: non-zero if any step failed. Run it with a device timeout_s of about 540.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET DATAEFF_KERNELS
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
# The kernels (folder triton_kernels/) import as lightning_dataeff.kernels once the project is installed.
# Without an install (a bare copy of the checkout), point Python at a folder of links with that layout.
if ! "$PY" -c "import lightning_dataeff.kernels" 2>/dev/null; then
    SHIM=$(mktemp -d)
    mkdir "$SHIM/lightning_dataeff"
    for f in "$PWD"/lightning_dataeff/*; do ln -s "$f" "$SHIM/lightning_dataeff/"; done
    ln -s "$PWD/triton_kernels" "$SHIM/lightning_dataeff/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
STAMP=$(mktemp)
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$RESULTS/gpu_check.log}
exec > >(tee "$LOG") 2>&1
status=0

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || status=1
"$PY" - <<'PY' || status=1
import platform, torch
import triton
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
PY
[ "$status" -eq 0 ] || { echo "gpu_check: no usable CUDA device, nothing run"; exit 1; }

# Triton compiles ~150 kernel specialisations for the tests: spread them over 4 workers when xdist is there.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4" || true)
# shellcheck disable=SC2086
step kernel-tests 180 "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_kernels.py \
    tests/test_kernels_sampling.py tests/test_kernels_compile.py
step kernel-benchmark 200 "$PY" benchmarks/kernels.py
if [ -f benchmarks/random_ltd_step.py ]; then
    step random-ltd-step 75 "$PY" benchmarks/random_ltd_step.py --device cuda
fi

if [ -n "${OUT:-}" ]; then  # bring the new results back (the log is already there)
    find "$RESULTS" -maxdepth 1 -type f -newer "$STAMP" \( -name '*.csv' -o -name '*.png' -o -name '*.md' \) \
        | head -n 7 | xargs -r cp -t "$OUT"
    ls -l "$OUT"
fi
rm -f "$STAMP"
echo "gpu_check: $([ "$status" -eq 0 ] && echo OK || echo FAILED)"
exit "$status"
