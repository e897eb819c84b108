#!/usr/bin/env bash
# GPU benchmark in one script: feature extraction (encoder alone vs the whole pipeline, tiles/s, GPU
# utilisation), BagNet training step (images/s) and MIL (abmil) training step (bags/s).
#
#   bash benchmarks/gpu.sh [--device cuda|cpu] [--quick] [--out DIR]      (default: cuda, bench_out/gpu)
#
# Python: $PYTHON, else .venv/bin/python when present, else python3. Logs of every step and the
# results (<step>.json, nvidia-smi samples *_gpu.csv) go to --out; the synthetic slide and bags stay
# there, so a rerun skips writing them. `--device cpu --quick` is the smoke test (tiny sizes, under a
# minute on 2 cores, utilisation "n/a"); sizes and what is measured: benchmarks/gpu_steps.py.
#
# Time budget of the full run on one H200 with 16 CPU cores (estimate 2-3.5 min in all; must stay < 8 min):
#   header        ~5 s      torch import, CUDA initialisation
#   1 extract     ~1.5-2.5 min  writing the 12,852-tile slide (31 s on one core of the 2-core dev VM; skipped
#                           on a rerun), then 8 x (pipeline ~4-9 s: tissue detection 2.4 s + reading at
#                           ~1,500-3,000+ tiles/s with 16 workers; encoder alone ~1 s)
#   2 bagnet      ~15-30 s  30 fp32 steps of batch 32 at 256² and 512² (12.6 / 50.7 GFLOP per image), 3 warm-up
#   3 mil         ~30-45 s  writing 68 bags of 10,000 x 1024 (2.8 GB, ~10 s), RAM cache, 4 epochs of 64 steps
#   summary       ~1 s
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

DEVICE=cuda
QUICK=""
OUT=bench_out/gpu
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --quick) QUICK=--quick; shift ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the steps run from the repository root
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
rm -f "$OUT"/extract.json "$OUT"/bagnet.json "$OUT"/mil.json  # no stale results in the summary

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)

# step NAME: run `gpu_steps.py NAME`, output to the terminal and to $OUT/NAME.log, then its wall time
step() {
    local name=$1 t0
    t0=$(now)
    echo
    echo "== $name"
    if ! "$PYTHON" benchmarks/gpu_steps.py "$name" --device "$DEVICE" --out "$OUT" $QUICK 2>&1 | tee "$OUT/$name.log"; then
        echo "error: step $name failed after $(since "$t0") s; full log: $OUT/$name.log" >&2
        exit 1
    fi
    echo "== $name: $(since "$t0") s wall"
}

echo "== Needle MIL GPU benchmark: device $DEVICE${QUICK:+ (quick)}, out $OUT, python $PYTHON, $(date -u +%FT%TZ)"
if [ "${DEVICE%%:*}" = cuda ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi -L
fi
echo "CPU cores: $(nproc)"
step env      # ~5 s
step extract  # budget <= 4 min: slide writing ~30-40 s (once), 8 interleaved rounds
step bagnet   # budget ~30 s
step mil      # budget ~45 s

echo
echo "== summary ($DEVICE${QUICK:+, quick}; total $(since "$T_START") s wall; logs in $OUT)"
"$PYTHON" benchmarks/gpu_steps.py summary --out "$OUT" | tee "$OUT/summary.txt"
