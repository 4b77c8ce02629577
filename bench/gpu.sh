#!/usr/bin/env bash
# Speed and accuracy on one GPU, as one prepared script (a lent device machine has minutes, not hours):
#   CIFAR10_DIR=/path/to/cifar10 OUT=/tmp/out bash bench/gpu.sh
# 1. a 1-epoch warm-up run, not counted (CUDA context, cuDNN autotuning; compilation with COMPILE=1),
# 2. bench.accuracy: `fast` for $SEEDS seeds through `accelerate launch` (time per run = training
#    and evaluation seconds, as summary.json's total_seconds),
# 3. bench.accuracy: `best` (airbench96-shaped, 31 epochs) for $BEST_SEEDS seeds (0: skip),
# 4. bench.throughput: the tutorial loop vs ours on seed3, and every preset fp32/bf16.
# Results (JSON lines, per-epoch metrics) land in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_bench}; mkdir -p "$OUT"; RUNS=${RUNS:-/tmp/gpu_bench_runs}
DATA=${CIFAR10_DIR:?set CIFAR10_DIR to the folder holding cifar-10-batches-bin}
SEEDS=${SEEDS:-5}; BEST_SEEDS=${BEST_SEEDS:-1}; MP=${MP:-bf16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
COMPILE_FLAG=$([ "${COMPILE:-0}" = 1 ] && echo --compile || echo --no-compile)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/log.txt"
launch="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision $MP --dynamo_backend no"
$launch cifar_dist/train.py --preset fast --epochs 1 --data-dir "$DATA" --output-dir "$RUNS/warmup" \
  $COMPILE_FLAG > "$OUT/warmup.log" 2>&1
python -m bench.accuracy --preset fast --seeds "$SEEDS" --out "$RUNS" --name "fast-$MP" --launch "$launch" \
  --results "$OUT/accuracy.jsonl" -- --data-dir "$DATA" $COMPILE_FLAG >> "$OUT/log.txt" 2>&1
[ "$BEST_SEEDS" -gt 0 ] && python -m bench.accuracy --preset best --seeds "$BEST_SEEDS" --out "$RUNS" \
  --name "best-$MP" --launch "$launch" --results "$OUT/accuracy.jsonl" -- --data-dir "$DATA" --eval-every 10 \
  $COMPILE_FLAG >> "$OUT/log.txt" 2>&1
for d in "$RUNS"/fast-"$MP"/seed-* "$RUNS"/best-"$MP"/seed-*; do
  cp "$d/metrics.jsonl" "$OUT/$(basename "$(dirname "$d")")-$(basename "$d")-metrics.jsonl" 2>/dev/null
done
[ "${THROUGHPUT:-1}" = 1 ] && python -m bench.throughput --data-dir "$DATA" --rounds 2 \
  --results "$OUT/throughput.jsonl" >> "$OUT/log.txt" 2>&1
cat "$OUT/log.txt"
