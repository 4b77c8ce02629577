"""Runs to a deadline on this machine: for each budget, the epochs planned, the epochs trained (after the plan
moved to the pace measured; the last may be a part of one), the wall-clock of the whole command (measured
here, from outside the process) against the budget, and the accuracy reached. One line appended to
bench/results/budget.jsonl.

    python -m bench.budget --budgets 2m,5m,10m -- --preset fast --data-dir ../shared/cifar10
    python -m bench.budget --budgets 2m,5m,10m -- --preset auto --data-dir ../shared/cifar10
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
from cifar_dist.budget import parse_duration
from cifar_dist.tables import text_table


def one(budget: str, train_args: list[str]) -> dict:
    """One budgeted run, a process of its own, timed from outside."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cifar_dist.train", *train_args, "--time-budget", budget, "--output-dir", tmp]
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = round(time.monotonic() - t0, 1)
        if r.returncode != 0:
            raise SystemExit(f"bench.budget: error: {' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
        s = json.loads((Path(tmp) / "summary.json").read_text())
        trained = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    plan, seconds = s["time_budget"], parse_duration(budget)
    chosen = (plan.get("auto") or {}).get("chosen")  # --preset auto's training
    return dict(budget=budget, budget_s=seconds, training=f"auto: {chosen}" if chosen else s["preset"],
                planned=plan["planned_epochs"], epochs=round(trained / plan["steps_per_epoch"], 2),
                changes=len(plan["changes"]), wall_s=wall, vs_budget=f"{wall / seconds:.3f}x",
                test_acc=round(100 * s.get("test_acc", s.get("val_acc", 0.0)), 2), micro_batch=s["micro_batch"],
                precision=s["mixed_precision"], plan=plan)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="2m,5m,10m", help="comma-separated durations")
    p.add_argument("--results", default="budget.jsonl", help="file under bench/results/ (or an absolute path)")
    p.add_argument("train_args", nargs="*", help="train.py flags, after --")
    a = p.parse_args()
    rows = []
    for budget in [b for b in a.budgets.split(",") if b]:
        rows.append(one(budget, a.train_args))
        print(text_table(rows[-1:], [k for k in rows[-1] if k != "plan"]), flush=True)
    print(f"\n{' '.join(a.train_args)}, {machine()}:")
    print(text_table(rows, [k for k in rows[0] if k != "plan"]))
    print(f"appended to {append_result(a.results, dict(train_args=a.train_args, rows=rows))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
