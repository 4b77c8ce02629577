"""The table `--preset auto` chooses from: each training of cifar_dist.recipes.AUTO trained on real CIFAR-10
for a few numbers of epochs (the schedule laid over them, as a time budget lays it), its test accuracy and
its wall-clock. Written to cifar_dist/auto_table.json (with the machine and this command) and appended to
bench/results/auto.jsonl.

    python -m bench.auto --data-dir ../shared/cifar10                    # quick and fast at 1, 2, 4 and 8 epochs
    python -m bench.auto --data-dir ../shared/cifar10 --epochs quick=1,2 fast=2,4

A run already finished in --out is read, not trained again (the same command goes on after a stop).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, append_result, command, machine
from cifar_dist.auto import TABLE
from cifar_dist.recipes import AUTO

EPOCHS = {"quick": [1, 2, 4, 8], "fast": [1, 2, 4, 8]}


def trained(name: str, epochs: int, data_dir: str, out: Path, extra: list[str]) -> dict:
    """One training of the table, or its summary if it already finished there."""
    run = out / f"{name}-{epochs}"
    if not (run / "summary.json").exists():
        cmd = [sys.executable, "-m", "cifar_dist.train", *AUTO[name], "--epochs", str(epochs), "--data-dir", data_dir,
               "--output-dir", str(run), *extra]
        print(" ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"bench.auto: error: {name} at {epochs} epochs failed (exit {r.returncode})")
    s = json.loads((run / "summary.json").read_text())
    return dict(candidate=name, epochs=epochs, test_acc=s["test_acc"], seconds=round(s["total_seconds"], 1),
                mixed_precision=s["mixed_precision"], train_flops=s["train_flops"])


def parse_epochs(items: list[str]) -> dict[str, list[int]]:
    table = {}
    for item in items:
        name, _, numbers = item.partition("=")
        if name not in AUTO or not numbers:
            raise SystemExit(f"bench.auto: error: --epochs takes NAME=N,N,... with NAME one of {', '.join(AUTO)}")
        table[name] = sorted(int(n) for n in numbers.split(","))
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 (binary or python layout)")
    p.add_argument("--epochs", nargs="*", default=[], help="NAME=N,N,... (default: quick=1,2,4,8 fast=1,2,4,8)")
    p.add_argument("--out", default="runs/auto-table", help="where the runs go (kept: a rerun reads them)")
    p.add_argument("--table", default=str(TABLE), help="the table written ('': none)")
    p.add_argument("--results", default="auto.jsonl", help="file under bench/results/ ('': none)")
    a, extra = p.parse_known_args()
    plan = parse_epochs(a.epochs) if a.epochs else EPOCHS
    rows = [trained(name, n, a.data_dir, Path(a.out), extra) for name, counts in plan.items() for n in counts]
    for row in rows:
        print(f"{row['candidate']:6} {row['epochs']:2} epochs: {row['test_acc']:.2%} in {row['seconds']:.0f}s")
    table = dict(machine=machine(), command=command(), rows=rows)
    if a.table:
        Path(a.table).write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {a.table}")
    if a.results:
        print(f"appended to {append_result(a.results, dict(rows=rows))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
