#!/usr/bin/env bash
# Accuracy of the presets on real CIFAR-10, on one GPU: every run goes through `accelerate launch`,
# several at once (these small nets leave a GPU mostly idle, so concurrent runs share it; per-run
# images/s are therefore lower than a run alone would get). Usage:
#   CIFAR10_DIR=/path/to/cifar10 OUT=/tmp/out bash bench/gpu_core.sh
set -u
OUT=${OUT:-/tmp/gpu_core}; mkdir -p "$OUT"; RUNS=${RUNS:-/tmp/gpu_runs}; mkdir -p "$RUNS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
launch() {  # name, mixed precision, train.py args...
  local name=$1 mp=$2; shift 2
  timeout ${JOB_TIMEOUT:-480} accelerate launch --num_processes 1 --num_machines 1 --mixed_precision "$mp" \
    --dynamo_backend no cifar_dist/train.py --output-dir "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
  echo "$name exit $?" >> "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/log.txt"
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" >> "$OUT/log.txt"
start=$(date +%s)
if [ -n "${SWEEP:-}" ]; then  # SWEEP="name:args;name:args" runs those instead of the presets
  IFS=';' read -ra jobs <<< "$SWEEP"
  for job in "${jobs[@]}"; do launch "${job%%:*}" bf16 ${job#*:} & done
else
launch seed3-default-s0 bf16 --preset seed3 --seed 0 --tracker tensorboard --feature-maps-every 5 &
for seed in 1 2 3 4; do launch seed3-default-s$seed bf16 --preset seed3 --seed $seed & done
launch seed2-default bf16 --preset seed2 &
launch resnet18-default bf16 --preset resnet18 &
if [ "${TUTORIAL:-1}" = 1 ]; then
  launch seed3-tutorial no --preset seed3 --recipe tutorial &
  launch seed2-tutorial no --preset seed2 --recipe tutorial &
fi
fi
wait
echo "all runs: $(( $(date +%s) - start )) s wall" >> "$OUT/log.txt"
python3 - "$RUNS" "$OUT" <<'PY'
import json, sys, shutil
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {}
for d in sorted(p for p in runs.iterdir() if p.is_dir()):
    r = {"metrics": [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []}
    if (d / "summary.json").exists():
        r["summary"] = json.loads((d / "summary.json").read_text())
    r["log_tail"] = (runs / f"{d.name}.log").read_text()[-1500:]
    results[d.name] = r
    s = r.get("summary")
    print(f"{d.name:28s}", f"test {s['test_acc']:.2%} best {s['best_test_acc']:.2%} epochs {s['epochs_completed']} {s['total_seconds']:.0f}s" if s else "NO SUMMARY")
(out / "results.json").write_text(json.dumps(results, indent=1))
pictures = runs / "seed3-default-s0"  # the README's pictures come from this real run
for src in ("curves.png", "confusion_matrix.png", "samples.png", "feature_maps/final/stem.png",
            "feature_maps/final/block1.png", "feature_maps/final/block2.png"):
    if (pictures / src).exists():
        shutil.copy(pictures / src, out / src.replace("feature_maps/final/", "features-"))
PY
