"""Wall-clock to a test accuracy, the tutorial's loop against the best we have, in one invocation on one
machine. Rows, one after another in this order (each a process of its own):

  quick     ours, the quickest way we have to the tutorial's accuracy (76.3 %, its loop's best in the
            issue's run): a narrow `fast` network, 1 epoch of the Muon recipe
  tutorial  the tutorial's own loop (bench/tutorial.py: seed3, Adam, PIL pipeline), to 76.3 %
  seed3     ours on the tutorial's own network, `seed3`, to 76.3 % (the comparison the tutorial invites)
  94        ours to 94 %: `fast` with its own recipe

Every clock counts training and the evaluations from the first step (data loading, start-up and
the precision probe excluded, on both sides). Ours runs with the default precision (auto); the
tutorial in fp32, as written. The `94` row also measures `fast`'s bare training step (random tensors,
the run's precision) at each micro-batch `--micro-batch auto` would try, and prints the time its
training FLOPs would take at the fastest one's rate (to the epoch it reached 94 %, or over all it trained
where it missed it): the run's time should be within 1.25x of it.
One line appended to bench/results/time_to_accuracy.jsonl.

    python -m bench.time_to_accuracy --data-dir ../shared/cifar10
    python -m bench.time_to_accuracy --data-dir ../shared/cifar10 --rows quick,tutorial
    python -m bench.time_to_accuracy --data-dir ../shared/cifar10 --rows 94 --flags 94 "--preset fast --recipe fast-sgd"
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, append_result, machine
from bench.throughput import ceiling
from bench.tutorial import run_script
from cifar_dist.config import resolve
from cifar_dist.flops import per_image
from cifar_dist.machine import micro_candidates
from cifar_dist.recipes import AUTO
from cifar_dist.tables import text_table

TUTORIAL_BEST = 0.763
# Each row: the accuracy it runs to and our train.py flags (None: the tutorial's loop).
ROWS: dict[str, tuple[float, list[str] | None]] = {
    "quick": (TUTORIAL_BEST, [*AUTO["quick"], "--epochs", "1"]),  # one epoch of --preset auto's smaller training
    "tutorial": (TUTORIAL_BEST, None),
    "seed3": (TUTORIAL_BEST, ["--preset", "seed3", "--epochs", "3", "--eval-every", "3", "--batch-size", "128",
                              "--crop-padding", "0", "--flip", "alternate", "--lookahead", "--label-smoothing", "0.2",
                              "--dirac-init"]),
    "94": (0.94, ["--preset", "fast", "--eval-every", "8"]),  # one evaluation, at the end: 6 views cost ~40 s
}


COLUMNS = ["row", "target", "seconds", "epoch", "best", "precision", "micro_batch", "gflops", "ideal_s", "vs ideal"]


def first_hit(history: list[dict], target: float) -> dict | None:
    return next((m for m in history if m.get("test_acc", 0) >= target), None)


def read_history(metrics: Path) -> list[dict]:
    return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []


def ours(data_dir: str, target: float, args: list[str]) -> tuple[list[dict], str]:
    """Run train.py; stop it once an epoch reaches the target. Elapsed = sum of epoch seconds. Also the
    precision the run chose (its start-up line)."""
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/out", "w+") as out:  # a file: a pipe could fill
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        cmd = [sys.executable, "-m", "cifar_dist.train", "--data-dir", data_dir, "--output-dir", f"{tmp}/run", *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        history: list[dict] = []
        while proc.poll() is None and not first_hit(history, target):
            time.sleep(2)
            history = read_history(metrics)
        proc.terminate()
        proc.wait()
        history = read_history(metrics)  # the last epochs may have landed after the last look
        out.seek(0)
        log = out.read()
        if not first_hit(history, target) and proc.returncode != 0:
            raise SystemExit(f"bench.time_to_accuracy: error: our run failed: {log[-500:]}")
    elapsed = 0.0
    for m in history:
        elapsed += m["seconds"]
        m["elapsed"] = elapsed
    precision = re.search(r"^precision: (\w+)", log, re.M)
    return history, precision.group(1) if precision else "no"


def tutorial(data_dir: str, target: float, epochs: int, subsets: list[str]) -> list[dict]:
    return run_script(data_dir, ["--epochs", str(epochs), "--target", str(target), *subsets], "bench.time_to_accuracy")


def bound(args: list[str], precision: str, seconds: float, epochs: int) -> dict:
    """The time the training FLOPs of the run's first `epochs` take at the rate of its bare training step
    (random tensors, the run's precision) at the micro-batch this machine runs fastest, measured now: each
    size `--micro-batch auto` would try (whole BatchNorm groups that divide the batch; without a group,
    whole multiples of the batch's largest divisor up to 128) gets an equal share of `seconds`."""
    cfg = resolve(args)
    unit = cfg.model.bn_group or max(d for d in range(1, 129) if cfg.batch_size % d == 0)
    sizes = micro_candidates(cfg.batch_size, unit)
    speed = {m: ceiling(cfg.preset, m, precision == "bf16", seconds / len(sizes), cfg.model) for m in sizes}
    best = max(speed, key=lambda m: speed[m])
    train_images = cfg.train_subset or 50_000
    per_train_image = per_image(cfg.model)[1]
    train_flops = per_train_image * (train_images // cfg.batch_size * cfg.batch_size) * epochs
    flop_rate = speed[best] * per_train_image
    return dict(gflops=round(flop_rate / 1e9), ideal_s=max(0.1, round(train_flops / flop_rate, 1)),
                micro_batch=best, step_images_per_s={str(m): round(v) for m, v in speed.items()})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="")
    p.add_argument("--rows", default=",".join(ROWS), help=f"which rows, in order ({', '.join(ROWS)})")
    p.add_argument("--flags", nargs=2, action="append", default=[], metavar=("ROW", "FLAGS"),
                   help="replace a row's train.py flags (one quoted string)")
    p.add_argument("--target", type=float, default=TUTORIAL_BEST, help="the target of every row but 94, 0..1")
    p.add_argument("--high-target", type=float, default=0.94, help="the 94 row's target, 0..1")
    p.add_argument("--train-subset", type=int, default=0, help="every row: the first N training images (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="every row: the first N test images (0: all)")
    p.add_argument("--tutorial-epochs", type=int, default=30, help="give up on the tutorial loop after N epochs")
    p.add_argument("--ceiling-seconds", type=float, default=20.0, help="seconds of the bare-step measurement")
    p.add_argument("--results", default="time_to_accuracy.jsonl",
                   help="file under bench/results/ (or an absolute path)")
    a = p.parse_args()
    a.rows = [r for r in a.rows.split(",") if r]
    if unknown := [r for r in a.rows + [row for row, _ in a.flags] if r not in ROWS]:
        p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    if "tutorial" in [r for r, _ in a.flags]:
        p.error("the tutorial row runs the tutorial's own loop: it takes no train.py flags")
    return a


def run_row(a: argparse.Namespace, name: str, args: list[str] | None) -> tuple[dict, dict]:
    """One row: its table line and its record (the per-epoch history, the bound for the 94 row)."""
    target = a.high_target if name == "94" else a.target
    subsets = ["--train-subset", str(a.train_subset), "--test-subset", str(a.test_subset)]
    if args is None:
        history, precision = tutorial(a.data_dir, target, a.tutorial_epochs, subsets), "no"
    else:
        args = [*args, *subsets]
        history, precision = ours(a.data_dir, target, args)
    hit = first_hit(history, target)
    row: dict[str, Any] = dict(row=name, target=f"{100 * target:.1f} %",
                               seconds=f"{hit['elapsed']:.0f}" if hit else "never",
                               epoch=hit["epoch"] if hit else f">{len(history)}", precision=precision,
                               best=f"{100 * max((m.get('test_acc', 0) for m in history), default=0):.2f}")
    if name == "94" and args is not None and history:
        # the speed against the bound even when the target was missed: over the epochs the run trained
        end = hit or history[-1]
        row.update(bound(args, precision, a.ceiling_seconds, end["epoch"]))
        row["vs ideal"] = f"{end['elapsed'] / row['ideal_s']:.2f}x"
    record: dict[str, Any] = dict(args=args, seconds=hit["elapsed"] if hit else None, precision=precision,
                                  history=[{k: m[k] for k in ("epoch", "test_acc", "elapsed") if k in m}
                                           for m in history],
                                  **{k: row[k] for k in ("gflops", "ideal_s", "micro_batch", "step_images_per_s")
                                     if k in row})
    return row, record


def main() -> int:
    a = parse_args()
    flags = {**{name: args for name, (_, args) in ROWS.items()}, **{r: shlex.split(f) for r, f in a.flags}}
    table, record = [], {}
    for name in a.rows:
        row, record[name] = run_row(a, name, flags[name])
        table.append(row)
        print(text_table(table[-1:], COLUMNS), flush=True)
    print(f"\ntime to accuracy on {machine()}:")
    print(text_table(table, COLUMNS))
    speedups = {}
    tut = record.get("tutorial", {}).get("seconds")
    for name in ("quick", "seed3"):
        if tut and record.get(name, {}).get("seconds"):
            speedups[name] = round(tut / record[name]["seconds"], 2)
            print(f"{name}: {speedups[name]:.1f}x sooner than the tutorial's loop to {100 * a.target:.1f} %")
    path = append_result(a.results, dict(target=a.target, high_target=a.high_target, rows=record, speedup=speedups))
    print(f"appended to {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
