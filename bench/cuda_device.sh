#!/usr/bin/env bash
# The CUDA target on a real GPU, in one command of about 5 minutes (8 at most):
# versions and nvidia-smi, a probe launch, then bench/cuda_device.py's correctness
# check of every built-in model beside tests/test_cuda.py on the GPU
# (BPTTGEN_CUDA_REAL=1), then the timings (CUDA module, CPU module, cuDNN).
#
#     bash bench/cuda_device.sh [--dry-run] [--sim] [--quick] [--no-tests]
#
# Results go to $OUT (default bench/results/): cuda_device.json (every number,
# rewritten as each piece finishes), cuda_device.log (this script's output) and
# test_cuda.log (pytest's). Every stage runs under timeout(1) within a budget of
# BPTTGEN_BUDGET_S seconds (default 450) for the whole script.
#
# Python: $PYTHON, else python3, used as it is when it imports numpy, scipy,
# numba, numba_cuda, sympy and jinja2 (a GPU machine's image usually has them; the
# repository is put on PYTHONPATH, nothing is installed). Otherwise, in this order:
# wheels in .whl/ (pip install --no-index, for a machine without a package
# index), or a venv in /tmp with `pip install -e ".[cuda]"` (needs the index).
# If numba-cuda's CUDA 13 build cannot launch on this driver, the probe is
# retried in a venv with `pip install "numba-cuda[cu12]"` (needs the index too).
# The H200 image of 2026-11 has numpy 2.5, which numba-cuda 0.30.4 cannot compile
# kernels under (np.row_stack is gone): there, carry numpy 2.3.5's wheel in .whl/
# (on this machine: pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 -d .whl numpy==2.3.5) and the probe's fallback
# installs it.
#
#   --dry-run   install nothing (say what would be installed); run the rest
#   --sim       no GPU: everything under the CUDA simulator at tiny sizes
#               (checks this script; NUMBA_ENABLE_CUDASIM=1, --quick, models elman)
#   --quick     bench/cuda_device.py --quick (tiny check, quick sizes, few rounds)
#   --no-tests  skip tests/test_cuda.py
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0 SIM=0 QUICK=0 TESTS=1
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        --sim) SIM=1 QUICK=1 ;;
        --quick) QUICK=1 ;;
        --no-tests) TESTS=0 ;;
        *) echo "unknown option $arg (see the head of $0)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-$ROOT/bench/results}
mkdir -p "$OUT"
JSON=$OUT/cuda_device.json
LOG=$OUT/cuda_device.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

BUDGET=${BPTTGEN_BUDGET_S:-450}
T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }
# stage_timeout WANTED RESERVE: WANTED seconds, or what the budget leaves after
# RESERVE seconds kept for the later stages (at least 20).
stage_timeout() {
    local t=$(( $(left) - $2 ))
    (( t > $1 )) && t=$1
    (( t < 20 )) && t=20
    echo $t
}
say() { echo; echo "=== [$((SECONDS - T0)) s] $*"; }

export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export BPTTGEN_CUDA_DEVICE_CACHE=${BPTTGEN_CUDA_DEVICE_CACHE:-/tmp/bpttgen-nbcache}
if (( SIM )); then
    export NUMBA_ENABLE_CUDASIM=1
else
    unset NUMBA_ENABLE_CUDASIM
fi

say "machine"
date -u +"%Y-%m-%dT%H:%M:%SZ"
uname -a
echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null)"
free -g 2>/dev/null | head -2
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,compute_cap --format=csv
else
    echo "nvidia-smi: not found"
fi
command -v nvcc >/dev/null && nvcc --version | tail -2

say "python environment"
PY=${PYTHON:-python3}
NEED="import numpy, scipy, numba, numba_cuda, sympy, jinja2"
SITE=/tmp/bpttgen-site
install_wheels() {  # wheels in .whl/ (no package index needed)
    [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null || return 1
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    (( DRY )) && { echo "(dry run: not installed)"; return 1; }
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl || return 1
    export PYTHONPATH=$SITE:$PYTHONPATH
}
make_venv() {  # a venv in $1 that also sees every package of $PY (which may be a venv
               # itself, whose packages --system-site-packages would not show)
    timeout 60 "$PY" -m venv "$1" || return 1
    local site
    site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
        >"$site/_bpttgen_parent.pth"
}
if timeout 120 "$PY" -c "$NEED" 2>/dev/null; then
    echo "using $("$PY" -c 'import sys; print(sys.executable)') as it is (no install)"
elif install_wheels && timeout 120 "$PY" -c "$NEED"; then
    echo "using $PY with the wheels of .whl/"
else
    VENV=/tmp/bpttgen-venv
    echo "$PY lacks: $("$PY" -c "$NEED" 2>&1 | tail -1)"
    echo "creating $VENV over $PY's packages (torch, if any) and pip install -e \".[cuda]\""
    if (( DRY )); then
        echo "(dry run: not installed)"
    else
        make_venv "$VENV" &&
            timeout "$(stage_timeout 240 300)" "$VENV/bin/python" -m pip install -q \
                --retries 1 --timeout 20 -e ".[cuda]" &&
            PY=$VENV/bin/python
    fi
    timeout 120 "$PY" -c "$NEED" || { echo "no usable Python environment: stopping"; exit 4; }
fi
timeout 60 "$PY" -m pip list 2>/dev/null |
    grep -i -E '^(numpy|scipy|numba|numba-cuda|llvmlite|cuda-|nvidia-|torch |cupy|pytest)' || true

probe() {  # a fresh JSON with versions, the GPU, one tiny call of a generated module
    timeout -k 5 "$(stage_timeout 120 240)" "$PY" bench/cuda_device.py --fresh \
        --stages probe --out "$JSON"
}
say "probe"
if ! probe; then
    echo "probe failed; fallbacks:"
    ok=0
    if [[ ${PYTHONPATH%%:*} != "$SITE" ]] && install_wheels; then
        say "probe again with the wheels of .whl/"
        probe && ok=1
    fi
    if (( ! ok && ! SIM )); then
        # A driver older than CUDA 13 cannot run the cu13 bindings: the CUDA 12 ones
        # in a venv over this Python's packages (numba, numpy, torch stay as they are).
        CU12=/tmp/bpttgen-cu12-venv
        echo "numba-cuda[cu12] in $CU12 (for a driver older than CUDA 13)"
        if (( DRY )); then
            echo "(dry run: not installed)"
        elif make_venv "$CU12" &&
                timeout "$(stage_timeout 180 240)" "$CU12/bin/python" -m pip install -q \
                    --retries 1 --timeout 20 "numba-cuda[cu12]"; then
            PY=$CU12/bin/python
            say "probe again with numba-cuda[cu12]"
            probe && ok=1
        else
            echo "pip install numba-cuda[cu12] failed (no package index on this machine?)"
        fi
    fi
    if (( ! ok )); then
        say "no usable GPU environment: stopping after $((SECONDS - T0)) s; see $JSON"
        exit 3
    fi
fi

PYARGS=(--no-tables)
(( QUICK )) && PYARGS+=(--quick)
(( SIM )) && PYARGS+=(--sizes 2,3,3,4,3 --models elman --test-cases elman:bptt,elman:forward)

STAGES=check
(( TESTS )) && STAGES=check,tests
say "$STAGES: every model against the CPU module, in parallel; tests/test_cuda.py beside it"
T_CHECK=$(stage_timeout 240 120)
timeout -k 5 "$T_CHECK" "$PY" bench/cuda_device.py --stages "$STAGES" --out "$JSON" \
    --budget $((T_CHECK - 10)) "${PYARGS[@]}"
CHECK_RC=$?
echo "$STAGES exit status $CHECK_RC"

say "time (alone on the machine)"
T_TIME=$(stage_timeout 200 15)
timeout -k 5 "$T_TIME" "$PY" bench/cuda_device.py --stages time --out "$JSON" \
    --budget $((T_TIME - 10)) "${PYARGS[@]}"
TIME_RC=$?
echo "time exit status $TIME_RC"

say "summary"
timeout 60 "$PY" bench/cuda_device.py --print --out "$JSON"
echo
echo "check/tests: exit $CHECK_RC, time: exit $TIME_RC (0: all within tolerance and every" \
     "worker finished); $((SECONDS - T0)) s in all"
echo "results: $JSON, $LOG, $OUT/test_cuda.log"
(( CHECK_RC == 0 && TIME_RC == 0 ))
