"""Test accuracy of a preset over K seeds on real CIFAR-10: mean ± std, epochs, wall time, training
FLOPs; one line appended to bench/results/accuracy.jsonl.

    python -m bench.accuracy --preset fast --seeds 3 -- --data-dir ../shared/cifar10 --eval-every 5
    python -m bench.accuracy --preset fast --seeds 5 --launch "accelerate launch --num_processes 1" -- ...

Seeds run one after another (each in its own process, `--launch` prefixes the command: accelerate
launch, srun, ...), each in <out>/<name>/seed-N. A seed whose run already finished there with the same
settings is read, not retrained, so an interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, append_result, machine
from cifar_dist.config import INCIDENTAL, ConfigError, resolve, to_dict
from cifar_dist.rundir import saved_differences
from cifar_dist.tables import text_table


def check_reusable(out: Path, wanted: dict) -> None:
    """A finished seed is reused only if every setting that changes a result is the same."""
    if diff := sorted(saved_differences(out, wanted, [k for k in wanted if k not in INCIDENTAL])):
        raise ConfigError(f"{out} holds a run with other {', '.join(diff)}; pass another --name")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (0..K-1 from --first-seed)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--name", default="", help="folder under --out (default: the preset)")
    p.add_argument("--out", default=str(ROOT / "runs" / "accuracy"))
    p.add_argument("--launch", default="", help="command prefix instead of `python -m cifar_dist.train`, "
                                               "e.g. 'accelerate launch --num_processes 1'")
    p.add_argument("--results", default="accuracy.jsonl", help="file under bench/results/ ('' : none)")
    p.add_argument("train_args", nargs="*", help="train.py flags, after --")
    return p.parse_args()


def run_seed(a: argparse.Namespace, base: list[str], folder: Path, seed: int) -> dict:
    """One seed in its own process (or read back when it already finished there); its table row."""
    out = folder / f"seed-{seed}"
    args = [*base, "--seed", str(seed), "--output-dir", str(out)]
    check_reusable(out, to_dict(resolve(args)))
    cmd = shlex.split(a.launch) + [str(ROOT / "cifar_dist" / "train.py")] if a.launch else \
        [sys.executable, "-m", "cifar_dist.train"]
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (folder / f"seed-{seed}.log").open("a") as log:
        code = subprocess.call([*cmd, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    if code != 0 or not (out / "summary.json").exists():
        raise SeedFailed(f"seed {seed} failed (exit {code}); see {folder}/seed-{seed}.log")
    s = json.loads((out / "summary.json").read_text())
    return dict(seed=seed, test_acc=f"{100 * s['test_acc']:.2f}", epochs=s["epochs_completed"],
                train_seconds=f"{s['total_seconds']:.0f}", wall_seconds=f"{wall:.0f}",
                train_pflops=f"{s['train_flops'] / 1e15:.3f}", _summary=s)


class SeedFailed(RuntimeError):
    pass


def report(a: argparse.Namespace, rows: list[dict]) -> dict:
    """Mean ± std over the seeds, printed; the record appended to bench/results/."""
    accs = [100 * r["_summary"]["test_acc"] for r in rows]
    first = rows[0]["_summary"]
    mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
    record = dict(preset=a.preset, recipe=first["recipe"], train_args=a.train_args, n=len(accs),
                  test_acc=[round(x, 2) for x in accs], mean=round(mean, 2), std=round(std, 2),
                  epochs=first["epochs_completed"], params=first["params"], train_flops=first["train_flops"],
                  train_seconds=[round(r["_summary"]["total_seconds"]) for r in rows], launch=a.launch)
    print(f"\n{a.preset} ({first['params']:,} params, recipe {first['recipe']}, {record['epochs']} epochs, "
          f"{first['train_flops'] / 1e15:.3f} PFLOP training): test accuracy {mean:.2f} ± {std:.2f} % "
          f"(n={len(accs)}, min {min(accs):.2f}, max {max(accs):.2f}); "
          f"{statistics.mean(record['train_seconds']):.0f} s per run on {machine()}")
    return record


def main() -> int:
    a = parse_args()
    base = ["--preset", a.preset, *a.train_args]
    folder = Path(a.out) / (a.name or a.preset)
    rows = []
    try:
        resolve(base)  # bad flags fail here, once, not in every seed
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            rows.append(run_seed(a, base, folder, seed))
            print(text_table(rows[-1:], ["seed", "test_acc", "epochs", "train_seconds", "wall_seconds",
                                         "train_pflops"]), flush=True)
    except ConfigError as e:
        print(f"bench.accuracy: error: {e}", file=sys.stderr)
        return 2
    except SeedFailed as e:
        print(f"bench.accuracy: error: {e}", file=sys.stderr)
        return 1
    record = report(a, rows)
    if a.results:
        print(f"appended to {append_result(a.results, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
