"""Wall-clock until `seed3` first reaches a test accuracy (default 76.3 %, the tutorial loop's best here):
the tutorial's loop (bench/tutorial.py) against ours (cifar_dist/train.py, default recipe unless flags
after -- say otherwise), on the same machine, one after the other. Both clocks count training and the
per-epoch test evaluation, from the first step (data loading and start-up excluded on both sides).
One line appended to bench/results/time_to_accuracy.jsonl.

    python -m bench.time_to_accuracy --data-dir ../shared/cifar10
    python -m bench.time_to_accuracy --data-dir ../shared/cifar10 -- --epochs 4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, append_result, machine
from cifar_dist.tables import text_table
from bench.tutorial import run_script


def first_hit(history: list[dict], target: float) -> dict | None:
    return next((m for m in history if m.get("test_acc", 0) >= target), None)


def read_history(metrics: Path) -> list[dict]:
    return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []


def ours(data_dir: str, target: float, extra: list[str]) -> list[dict]:
    """Run train.py; stop it once an epoch reaches the target. Elapsed = sum of epoch seconds."""
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/stderr", "w+") as err:  # a file: a pipe could fill
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        cmd = [sys.executable, "-m", "cifar_dist.train", "--preset", "seed3", "--data-dir", data_dir,
               "--output-dir", f"{tmp}/run", *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True)
        history: list[dict] = []
        while proc.poll() is None and not first_hit(history, target):
            time.sleep(2)
            history = read_history(metrics)
        proc.terminate()
        proc.wait()
        history = read_history(metrics)  # the last epochs may have landed after the last look
        if not first_hit(history, target) and proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"bench.time_to_accuracy: error: our run failed: {err.read()[-500:]}")
    elapsed = 0.0
    for m in history:
        elapsed += m["seconds"]
        m["elapsed"] = elapsed
    return history


def tutorial(data_dir: str, target: float, epochs: int, subsets: list[str]) -> list[dict]:
    return run_script(data_dir, ["--epochs", str(epochs), "--target", str(target), *subsets],
                      "bench.time_to_accuracy")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="")
    p.add_argument("--target", type=float, default=0.763, help="test accuracy to reach, 0..1")
    p.add_argument("--tutorial-epochs", type=int, default=30, help="give up on the tutorial loop after N epochs")
    p.add_argument("--train-subset", type=int, default=0, help="both sides: the first N training images (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="both sides: the first N test images (0: all)")
    p.add_argument("train_args", nargs="*", help="train.py flags for our side, after --")
    p.add_argument("--results", default="time_to_accuracy.jsonl", help="file under bench/results/ (or an absolute path)")
    a = p.parse_args()
    subsets = ["--train-subset", str(a.train_subset), "--test-subset", str(a.test_subset)]
    rows = []
    for name, run in (("ours", lambda: ours(a.data_dir, a.target, [*subsets, *a.train_args])),
                      ("tutorial", lambda: tutorial(a.data_dir, a.target, a.tutorial_epochs, subsets))):
        history = run()
        hit = first_hit(history, a.target)
        seconds = hit["elapsed"] if hit else None
        rows.append(dict(loop=name, seconds=f"{seconds:.0f}" if seconds else "never",
                         epoch=hit["epoch"] if hit else f">{len(history)}",
                         best=f"{100 * max(m.get('test_acc', 0) for m in history):.2f}", _s=seconds,
                         _history=[{k: m[k] for k in ("epoch", "test_acc", "elapsed") if k in m} for m in history]))
        print(text_table(rows[-1:], ["loop", "seconds", "epoch", "best"]), flush=True)
    speedup = rows[1]["_s"] / rows[0]["_s"] if rows[0]["_s"] and rows[1]["_s"] else None
    print(f"\nseed3 to {100 * a.target:.1f} % test accuracy on {machine()}:")
    print(text_table(rows, ["loop", "seconds", "epoch", "best"]))
    print(f"ours is {speedup:.1f}x sooner" if speedup else "no ratio: a side never reached the target")
    path = append_result(a.results, dict(target=a.target, train_args=a.train_args,
                                                        speedup=round(speedup, 2) if speedup else None,
                                                        runs={r["loop"]: r["_history"] for r in rows}))
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
