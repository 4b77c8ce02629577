#!/usr/bin/env bash
# Ours beside the reference on one GPU, as one prepared call (a lent device machine has 15 minutes in all;
# this fits in one 10-minute command, installs included, and so does a rerun):
#   1. airbench from .whl/ (the device machine reaches no index), else from PyPI,
#   2. bench.reference --pair 94: airbench94 x$RUNS and our `fast` x$RUNS through accelerate launch,
#   3. bench.reference --pair 96: airbench96 and our `best`, $BEST_RUNS each, if $BEST_AFTER seconds have not
#      passed by then (0 runs: skip),
#   4. bench.profile: where our `fast` step's GPU time goes (torch.profiler), for the next round of speed work.
# Results (JSON lines, the log) land in $OUT.
#
# Getting the data there: the working tree travels, 64 MiB at most per call, and CIFAR-10 is 176 MiB that no
# compression shrinks. Once, here: `echo /.whl/ >> .git/info/exclude; echo /.cifar >> .git/info/exclude;
# pip wheel --no-deps airbench==0.1.8 -w .whl; ln -s ../shared/cifar10/cifar-10-batches-bin .cifar`. Then three
# calls back to back (a machine stays warm 30 s, and ignored paths already there stay between calls):
#   run(carry=[".cifar/data_batch_1.bin", ".cifar/data_batch_2.bin"], command="true")
#   run(carry=[".cifar/data_batch_3.bin", ".cifar/data_batch_4.bin"], command="true")
#   run(carry=[".cifar/data_batch_5.bin", ".cifar/test_batch.bin", ".cifar/batches.meta.txt", ".whl"],
#       command="CIFAR10_DIR=.cifar OUT=$OUT bash bench/gpu.sh", timeout_s=600)
# On a machine that has the data:  CIFAR10_DIR=/path/to/cifar10 OUT=/tmp/out bash bench/gpu.sh
# Without a GPU, DRY_RUN=1 checks everything but the runs (the data files airbench reads, our commands).
set -u
OUT=${OUT:-/tmp/gpu_bench}; mkdir -p "$OUT"; WORK=${WORK:-/tmp/gpu_bench_work}
DATA=${CIFAR10_DIR:?set CIFAR10_DIR to the folder holding the CIFAR-10 batches}
RUNS=${RUNS:-5}; BEST_RUNS=${BEST_RUNS:-1}; BEST_AFTER=${BEST_AFTER:-300}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "$*" | tee -a "$OUT/log.txt"; }
if [ "${DRY_RUN:-0}" = 1 ]; then
  python -m bench.reference --data-dir "$DATA" --pair 94 --runs "$RUNS" --workdir "$WORK/94" --dry-run
  exit $?
fi
log "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
python -c "import airbench" 2>/dev/null || pip install -q --no-index --find-links .whl airbench 2>/dev/null \
  || pip install -q airbench || { log "cannot install airbench"; exit 1; }
python -m bench.reference --data-dir "$DATA" --pair 94 --runs "$RUNS" --workdir "$WORK/94" \
  --results "$OUT/reference.jsonl" 2>&1 | tee -a "$OUT/log.txt"
if [ "$BEST_RUNS" -gt 0 ] && [ $(( $(date +%s) - start )) -lt "$BEST_AFTER" ]; then
  python -m bench.reference --data-dir "$DATA" --pair 96 --runs "$BEST_RUNS" --workdir "$WORK/96" \
    --results "$OUT/reference.jsonl" 2>&1 | tee -a "$OUT/log.txt"
else
  log "skipped the 96 pair: $(( $(date +%s) - start )) s had passed (BEST_AFTER=$BEST_AFTER)"
fi
python -m bench.profile --data-dir "$DATA" --preset fast 2>&1 | tee "$OUT/profile.txt" | tail -30 >> "$OUT/log.txt"
log "gpu.sh done in $(( $(date +%s) - start )) s"
