#!/usr/bin/env bash
# The GPU acceptance run: everything a short rented GPU slot should verify and measure, in <= 8 min.
#
#   bash bench/gpu_acceptance.sh [--emulate] [--out DIR] [--data-dir DIR] [--budget SECONDS]
#
# Made for an H100/H200 whose Python already holds CuPy (14.2) and PyTorch (2.11), with no network:
#   * gpumlp is installed from this checkout with `pip install --no-deps --no-build-isolation -e .`
#     (skipped when the checkout is already what Python imports);
#   * MNIST must travel inside the checkout, in data/mnist/ (ignored by git), since nothing beside
#     the checkout comes along. From a development machine: mkdir -p data/mnist && cp ../shared/mnist/*.gz data/mnist/
#
# Steps, each under its own timeout (and never past the overall budget, so one hang cannot eat the
# slot): the environment; the install; the data; `python -m gpumlp.selfcheck`; `pytest -m gpu`; the
# profiler for nets 1 and 4 (the graph engine timed, the persistent and spread engines' models); the
# bench for nets 1 and 4 at batch 1, the three engines against PyTorch eager and CUDA-graphed; 2 epochs
# of net 4 on full MNIST with each engine (seconds per epoch), whether graph and persistent end with
# the same weights_sha256 (spread sums in another order: its test error is printed beside theirs);
# compute-sanitizer memcheck and racecheck on a tiny run of each engine where the tool is present.
# Raw outputs and a markdown summary (the last thing printed) go to $OUT (--out; default
# bench/acceptance-<gpu>/, ignored by git).
#
# --emulate: the same sequence at tiny sizes on the CPU emulator (< 3 min, no GPU), skipping what
# needs a GPU, PyTorch or compute-sanitizer with the reason; tests/test_gpu_acceptance.py runs it.
# Exit status: 0 when no step failed or timed out, 1 otherwise, 2 for a bad flag.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}

MODE=gpu OUT="" DATA="" BUDGET=""
while [ $# -gt 0 ]; do
    case "$1" in
        --emulate) MODE=emulate ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --data-dir) DATA=${2:?--data-dir needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$BUDGET" ] && ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then echo "error: --budget must be whole seconds" >&2; exit 2; fi

if [ "$MODE" = gpu ]; then
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    SLUG=$(printf '%s' "${GPU_NAME:-unknown-gpu}" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
    BUDGET=${BUDGET:-470}          # 7 min 50 s: the slot is 8 minutes
else
    GPU_NAME="none (--emulate: the CPU emulator)"
    SLUG=emulate
    BUDGET=${BUDGET:-170}
fi
OUT=${OUT:-bench/acceptance-$SLUG}
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
if [ -z "$DATA" ]; then
    DATA=data/mnist
    if [ "$MODE" = emulate ] && [ ! -d "$DATA" ] && [ -d ../shared/mnist ]; then DATA=../shared/mnist; fi
fi
STEPS="$OUT/steps.tsv"
: > "$STEPS"
# the run directories of an earlier acceptance run into the same $OUT (a run refuses a used folder)
rm -rf "$OUT"/run-net4-* "$OUT"/run-emulated-* "$OUT"/run-memcheck-* "$OUT"/run-racecheck-*
START=$(date +%s)

# record NAME STATUS SECONDS RESULT
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"; }

# run_step NAME TIMEOUT CMD...: runs CMD (output in $OUT/NAME.log) under min(TIMEOUT, time left).
# Sets STATUS (pass, FAIL (exit N), timeout) and LOG for the caller's result line.
run_step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    LOG="$OUT/$name.log"
    if [ "$left" -lt 10 ]; then   # a step the slot had no time for is a fault of the run, not a skip
        record "$name" "not run" 0 "no time left in the ${BUDGET} s budget"; return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit} s): $(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-150)" >&2
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$LOG" 2>&1
    local rc=$?
    ELAPSED=$(( $(date +%s) - t0 ))
    case $rc in
        0) STATUS=pass ;;
        124|137) STATUS=timeout ;;
        *) STATUS="FAIL (exit $rc)" ;;
    esac
    return 0
}
skip() { record "$1" skipped 0 "$2"; }
# finish NAME RESULT: records the step just run; one that did not pass shows its log's last line
finish() { local result=$2; [ "$STATUS" = pass ] || result="$(last_line "$LOG")"; record "$1" "$STATUS" "$ELAPSED" "$result"; }
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 | tr '|' '/' | cut -c1-240; }
line_with() { grep -m 1 "$1" "$2" | tr '|' '/' | cut -c1-240; }

# -- 1. the environment -------------------------------------------------------------------------
if run_step environment 60 "$PY" -c '
import platform, shutil, subprocess, numpy
parts = [f"Python {platform.python_version()}", f"numpy {numpy.__version__}"]
try:
    import cupy
    parts.append(f"CuPy {cupy.__version__}")
    try:
        rt = cupy.cuda.runtime
        parts.append(f"CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}")
    except Exception as error:
        parts.append(f"no CUDA driver ({type(error).__name__})")
except Exception as error:
    parts.append(f"CuPy: {type(error).__name__}")
try:
    import torch
    parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
except Exception as error:
    parts.append(f"torch: {type(error).__name__}")
try:
    import pytest
    parts.append(f"pytest {pytest.__version__}")
except Exception:
    parts.append("pytest: missing")
gxx = shutil.which("g++")   # the emulator, which some gpu tests compare against, compiles with it
parts.append(subprocess.run([gxx, "-dumpfullversion"], capture_output=True, text=True).stdout.strip().join(["g++ ", ""])
             if gxx else "g++: missing")
print(", ".join(parts))'; then
    [ "$MODE" = gpu ] && nvidia-smi >> "$LOG" 2>&1
    finish environment "GPU: ${GPU_NAME:-not found}; $(head -n 1 "$LOG" | tr '|' '/')"
fi

# -- 2. the install -----------------------------------------------------------------------------
# asked from / : from the checkout itself Python would import gpumlp through the current directory
INSTALLED=$(cd / && "$PY" -c 'import gpumlp, pathlib; print(pathlib.Path(gpumlp.__file__).resolve().parent.parent)' 2>/dev/null)
if [ "$INSTALLED" = "$ROOT" ]; then
    skip install "Python already imports gpumlp from this checkout"
elif run_step install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .; then
    if [ "$STATUS" = pass ]; then
        finish install "$(last_line "$LOG")"
    else   # the later steps can still import gpumlp (and find its kernels) from the checkout
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        why=$(grep -m 1 -i 'configuration error' "$LOG" || grep -m 1 -iE '^ *error' "$LOG")
        why=$(printf '%s' "$why" | sed 's/^ *//' | tr '|' '/' | cut -c1-200)
        record install "$STATUS" "$ELAPSED" "${why:-$(last_line "$LOG")}; the later steps use PYTHONPATH=$ROOT"
    fi
fi

# -- 3. the data --------------------------------------------------------------------------------
HAVE_DATA=no
if ls "$DATA"/train-images-idx3-ubyte* "$DATA"/t10k-labels-idx1-ubyte* > /dev/null 2>&1; then
    HAVE_DATA=yes
    record data pass 0 "MNIST in $DATA"
elif [ "$MODE" = gpu ]; then
    record data FAIL 0 "no MNIST in $DATA: mkdir -p data/mnist && cp ../shared/mnist/*.gz data/mnist/ before the slot"
else
    skip data "no MNIST in $DATA or ../shared/mnist: the training step is left out"
fi

# -- 4. the self-check --------------------------------------------------------------------------
SELF_ARGS=(--device cuda); [ "$MODE" = emulate ] && SELF_ARGS=(--device emulate --quick)   # tiny: small shapes
if run_step selfcheck 120 "$PY" -m gpumlp.selfcheck "${SELF_ARGS[@]}"; then
    finish selfcheck "$(last_line "$LOG")"
fi

# -- 5. the GPU tests ---------------------------------------------------------------------------
if ! "$PY" -c 'import pytest' > /dev/null 2>&1; then
    record pytest-gpu "not run" 0 "pytest is not installed in $PY: install it (and its dependencies) before the slot"
elif run_step pytest-gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs; then
    result=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$LOG" | tail -n 1 | tr -d '=' | sed 's/^ *//')
    if [ "$MODE" = emulate ]; then
        finish pytest-gpu "$result (no GPU: every gpu test skips)"
    elif [ "$STATUS" = pass ] && ! grep -qE '[0-9]+ passed' "$LOG"; then
        record pytest-gpu FAIL "$ELAPSED" "no gpu test ran on the GPU: $result"
    else
        finish pytest-gpu "$result"   # (pytest exits 5 when it collects nothing: a fault here too)
    fi
fi

# -- 6. the profiler ----------------------------------------------------------------------------
for net in 1 4; do
    if [ "$MODE" = gpu ]; then
        run_step "profile-net$net" 90 "$PY" -m gpumlp.profile --net "$net" --json "$OUT/profile-net$net.json" || continue
        result="$(line_with '^measured:' "$LOG" | cut -c1-120) / $(line_with '^implied:' "$LOG")"
        if [ "$STATUS" = pass ] && ! grep -q '^measured:' "$LOG"; then
            record "profile-net$net" FAIL "$ELAPSED" "not timed (no usable GPU?): $(line_with '^no GPU' "$LOG")"
            continue
        fi
    else
        run_step "profile-net$net" 60 "$PY" -m gpumlp.profile --net "$net" --static --arch sm_90 || continue
        result="static only (no GPU to time): $(line_with '^step (' "$LOG")"
    fi
    finish "profile-net$net" "$result"
    # the persistent engine: the profiler models it (on a GPU the bench and training steps time it)
    for engine in persistent spread; do
        run_step "profile-net$net-$engine" 60 "$PY" -m gpumlp.profile --net "$net" --engine "$engine" --arch sm_90 \
            && finish "profile-net$net-$engine" "model: $(line_with '^expected:' "$LOG" | cut -c1-160)"
    done
done

# -- 7. the bench -------------------------------------------------------------------------------
if [ "$MODE" = emulate ]; then
    # bench --device has no emulator: the CPU bench at a tiny size proves the command line only
    if run_step bench-cpu 60 "$PY" -m gpumlp.bench --device cpu --hidden 16 --images 32 --repeats 1 \
            --synthetic --out "$OUT/bench-cpu.md"; then
        finish bench-cpu "CPU stand-in at 841-16-10: $(grep -m 1 -E '^\| gpumlp' "$OUT/bench-cpu.md" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $6); print $6 " img/s"}')"
    fi
    skip bench-net1-net4 "needs a GPU and PyTorch (gpumlp against PyTorch eager and CUDA-graphed)"
else
    for net in 1 4; do
        run_step "bench-net$net" 120 "$PY" -m gpumlp.bench --net "$net" --batch-size 1 --images 5000 --repeats 3 \
            --require-torch --data-dir "$DATA" --out "$OUT/bench-net$net.md" || continue
        result=$(grep -E '^\| (gpumlp|PyTorch)' "$OUT/bench-net$net.md" 2>/dev/null \
                 | awk -F'|' '{gsub(/^ +| +$/, "", $2); gsub(/^ +| +$/, "", $6); gsub(/^ +| +$/, "", $8); printf "%s%s %s img/s (%s)", sep, $2, $6, $8; sep="; "}')
        finish "bench-net$net" "${result:-no table: see $LOG}"
    done
fi

# -- 8. training --------------------------------------------------------------------------------
epochs_line() {   # seconds per epoch and the last test error, from a run directory's metrics.jsonl
    "$PY" -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
seconds = ", ".join("%.1f" % r["seconds"] for r in rows)
last = rows[-1]
print("%d epochs, seconds per epoch %s; test error %.2f%% after epoch %d"
      % (len(rows), seconds, 100 * last["test_error"], last["epoch"]))' "$1" 2>/dev/null
}
if [ "$HAVE_DATA" = no ]; then
    skip train "no MNIST in $DATA"
else
    if [ "$MODE" = gpu ]; then
        RUN_PREFIX=run-net4
        for engine in graph persistent spread; do
            run_step "train-net4-$engine" 150 "$PY" reproduce_2010.py --net 4 --epochs 2 --device cuda \
                --engine "$engine" --checkpoint-every 1 --data-dir "$DATA" --out "$OUT/run-net4-$engine" \
                && finish "train-net4-$engine" "$(epochs_line "$OUT/run-net4-$engine" || echo "no metrics: see $LOG")"
        done
    else
        RUN_PREFIX=run-emulated
        for engine in graph persistent spread; do
            run_step "train-emulated-$engine" 90 "$PY" reproduce_2010.py --device emulate --engine "$engine" \
                --hidden 16 --train-images 256 --test-images 256 --epochs 2 --checkpoint-every 1 --data-dir "$DATA" \
                --out "$OUT/run-emulated-$engine" && finish "train-emulated-$engine" \
                "841-16-10 on 256 digits (net 4 needs a GPU): $(epochs_line "$OUT/run-emulated-$engine" || echo "no metrics: see $LOG")"
        done
    fi
    # both engines must end with the same weights, bit for bit
    if run_step engines-agree 10 "$PY" -c '
import json, sys
shas = [json.load(open(f"{sys.argv[1]}-{engine}/summary.json"))["weights_sha256"] for engine in ("graph", "persistent")]
print(f"the same weights_sha256 {shas[0][:16]}..." if shas[0] == shas[1] else f"DIFFERENT: graph {shas[0][:16]}..., persistent {shas[1][:16]}...")
sys.exit(shas[0] != shas[1])' "$OUT/$RUN_PREFIX"; then
        finish engines-agree "$(last_line "$LOG")"
    fi
fi

# -- 9. compute-sanitizer -----------------------------------------------------------------------
# reproduce_2010.py with CuPy's memory pool off: every array is then its own cudaMalloc, whose bounds
# memcheck knows (inside a pooled block an overrun would land in a neighbour and pass unseen)
UNPOOLED_REPRODUCE='import runpy, sys, cupy
cupy.cuda.set_allocator(None)
sys.argv = ["reproduce_2010.py", *sys.argv[1:]]
runpy.run_path("reproduce_2010.py", run_name="__main__")'
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
for tool in memcheck racecheck; do
    if [ "$MODE" = emulate ]; then
        skip "sanitizer-$tool" "needs a GPU (compute-sanitizer checks real launches)"
    elif [ -z "$SANITIZER" ]; then
        skip "sanitizer-$tool" "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"
    elif [ "$HAVE_DATA" = no ]; then
        skip "sanitizer-$tool" "no MNIST in $DATA"
    else
        for engine in graph persistent spread; do
            run_step "sanitizer-$tool-$engine" 90 "$SANITIZER" --tool "$tool" --error-exitcode 3 \
                "$PY" -c "$UNPOOLED_REPRODUCE" --device cuda --engine "$engine" --hidden 16 --train-images 64 \
                --test-images 64 --epochs 1 --graph-steps 8 --skip-selfcheck --data-dir "$DATA" \
                --out "$OUT/run-$tool-$engine" && finish "sanitizer-$tool-$engine" "$(line_with 'ERROR SUMMARY' "$LOG")"
        done
    fi
done

# -- the summary --------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
BAD=$(awk -F'\t' '$2 != "pass" && $2 != "skipped" {printf "%s%s", sep, $1; sep=", "}' "$STEPS")
PASSED=$(awk -F'\t' '$2 == "pass"' "$STEPS" | wc -l | tr -d ' ')
SKIPPED=$(awk -F'\t' '$2 == "skipped"' "$STEPS" | wc -l | tr -d ' ')
{
    echo "# gpumlp acceptance run: ${GPU_NAME:-no GPU found}"
    echo
    echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), mode $MODE, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $TOTAL s of a $BUDGET s budget"
    echo "- raw outputs: $OUT/<step>.log"
    echo
    echo "| step | status | seconds | result |"
    echo "|---|---|---:|---|"
    awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$STEPS"
    echo
    if [ -z "$BAD" ]; then
        echo "verdict: PASSED (steps passed: $PASSED, skipped: $SKIPPED)"
    else
        echo "verdict: FAILED: $BAD (steps passed: $PASSED, skipped: $SKIPPED)"
    fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
[ -z "$BAD" ]
