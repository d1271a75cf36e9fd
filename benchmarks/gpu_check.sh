#!/usr/bin/env bash
# The GPU check in one command (benchmarks/README.md): install the carried wheels, run steps a-e of
# benchmarks/gpu_check.py each in its own process under its own time budget, print one line per
# step and a results table (Markdown and JSON under $OUT when it is set, with this whole log).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--steps abcde]
#
# Without CUDA (or with --dry-run) every step runs its CPU-side code at tiny shapes instead.
# Environment: PYTHON (default python3), OUT, SITE (where wheels go, default /tmp/site),
# GPU_CHECK_TOTAL_S (the whole run's cap), GPU_CHECK_BUDGET_A..E (one step's seconds).
# Exit status: 0 when every step ran and was within tolerance; 1 otherwise; 2 for bad arguments.
set -u -o pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$script")/.."

PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
dry=0
steps=abcde
args=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --steps) steps=${2:-}; shift ;;
        --steps=*) steps=${1#--steps=} ;;
        -h|--help) sed -n '2,11p' "$script" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument '$1' (use --dry-run, --steps abcde)" >&2; exit 2 ;;
    esac
    shift
done
steps=${steps//,/}
if ! [[ "$steps" =~ ^[a-e]+$ ]]; then
    echo "gpu_check.sh: error: --steps takes letters a to e, e.g. --steps ace, not '$steps'" >&2
    exit 2
fi
if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_TEED:-}" ]; then  # the whole log into $OUT, synchronously
    mkdir -p "$OUT" && GPU_CHECK_TEED=1 bash "$script" ${args[@]+"${args[@]}"} 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=0
echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n), $PYTHON ($("$PYTHON" --version 2>&1))"

if ls .whl/*.whl >/dev/null 2>&1; then
    if "$PYTHON" benchmarks/gpu_check.py wheels .whl; then
        echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl into $SITE"
        if timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .whl/*.whl; then
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        else
            echo "wheel install: FAILED (the steps run with what $PYTHON has)"
            failed=1
        fi
    fi
else
    echo "no .whl folder (make gpu-wheels makes it): wheel install skipped, using $PYTHON's own packages"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"  # the repo itself: no pip install

if [ "$dry" = 1 ]; then
    mode=dry; echo "dry run (--dry-run): CPU-side code at tiny shapes"
elif "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    mode=gpu
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    mode=dry; echo "no CUDA device (torch.cuda.is_available() is False): doing the dry run"
fi

if [ "$mode" = gpu ]; then
    total=${GPU_CHECK_TOTAL_S:-420}; budgets=(a:60 b:140 c:110 d:80 e:45)
else
    total=${GPU_CHECK_TOTAL_S:-900}; budgets=(a:120 b:120 c:240 d:120 e:120)
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "mode $mode, steps $steps, at most ${total}s in all; work in $work"

for entry in "${budgets[@]}"; do
    step=${entry%%:*}
    [[ "$steps" == *"$step"* ]] || continue
    override="GPU_CHECK_BUDGET_${step^^}"
    budget=${!override:-${entry#*:}}
    left=$((total - SECONDS))
    echo "--- step $step (budget ${budget}s, ${left}s left of ${total}s)"
    if [ "$left" -lt 5 ]; then
        "$PYTHON" benchmarks/gpu_check.py record "$step" timeout "not started: the ${total}s cap was reached" --work "$work"
        failed=1; continue
    fi
    [ "$budget" -gt "$left" ] && budget=$left
    start=$SECONDS
    timeout --kill-after=10 "$budget" "$PYTHON" benchmarks/gpu_check.py step "$step" --mode "$mode" --work "$work"
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        "$PYTHON" benchmarks/gpu_check.py record "$step" timeout "after ${budget}s" --seconds "$((SECONDS - start))" \
            --work "$work"
    elif [ "$rc" != 0 ]; then
        "$PYTHON" benchmarks/gpu_check.py record "$step" failed "exited with $rc, no result" --if-missing \
            --seconds "$((SECONDS - start))" --work "$work"
    fi
    [ "$rc" = 0 ] || failed=1
done

echo "--- results (${SECONDS}s in all)"
"$PYTHON" benchmarks/gpu_check.py table --mode "$mode" --work "$work" --steps "$steps" ${OUT:+--out "$OUT"} || failed=1
exit "$failed"
