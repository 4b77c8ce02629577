"""PBT against ASHA at the same trial budget: the same space, samples, epochs, data and seed, one search
after the other on this machine, side by side.

    python -m bench.search -- --space tune/space-small.yaml --data-dir ../shared/cifar10 --train-subset 10000 \
        --val-size 2000 --num-samples 8 --max-epochs 6 --perturbation-interval 2

Each search is `python tune/search.py --scheduler S --output-dir <out>/S <the flags after -->`. One line per
scheduler is appended to bench/results/search.jsonl (best validation accuracy and its trial, wall time,
epochs trained by all trials, exploits), and the last search's picture is copied to
bench/results/search-<scheduler>.png.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, append_result, machine
from cifar_dist.tables import text_table


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedulers", default="asha,pbt", help="comma-separated, run in this order")
    p.add_argument("--out", default=str(ROOT / "runs" / "search-bench"), help="one search directory per scheduler")
    p.add_argument("--results", default="search.jsonl", help="file under bench/results/ ('' : none)")
    p.add_argument("search_args", nargs="*", help="tune/search.py flags, after --")
    return p.parse_args()


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def run_search(scheduler: str, out: Path, search_args: list[str]) -> dict[str, Any]:
    """One search, timed; what it found, read back from its files."""
    if out.exists():
        sys.exit(f"bench.search: error: {out} exists; remove it or use another --out")
    cmd = [sys.executable, str(ROOT / "tune" / "search.py"), "--scheduler", scheduler, "--output-dir", str(out),
           *search_args]
    start = time.time()
    r = subprocess.run(cmd)
    wall = time.time() - start
    if r.returncode:
        sys.exit(f"bench.search: error: the {scheduler} search failed (exit {r.returncode}); see {out}")
    trials = [row for row in read_csv(out / "results.csv") if row["status"] != "failed" and row["val_acc"]]
    if not trials:
        sys.exit(f"bench.search: error: no trial of the {scheduler} search finished an epoch; see {out}")
    best = max(trials, key=lambda row: float(row["val_acc"]))
    return dict(scheduler=scheduler, best_val_acc=float(best["val_acc"]), best_trial=best["trial"],
                best_params=int(best["params"]), wall_seconds=round(wall, 1), trials=len(trials),
                trial_epochs=len(read_csv(out / "history.csv")), exploits=len(read_csv(out / "exploits.csv")),
                search_dir=str(out))


def main() -> int:
    args = parse_args()
    found = []
    for scheduler in args.schedulers.split(","):
        record = run_search(scheduler, Path(args.out) / scheduler, args.search_args)
        shutil.copy(Path(record["search_dir"]) / "search.png", RESULTS / f"search-{scheduler}.png")
        found.append(record)
    first = found[0]
    for record in found:
        record["wall_vs_first"] = round(record["wall_seconds"] / first["wall_seconds"], 2)
        if args.results:
            append_result(args.results, {**record, "search_args": args.search_args})
    print(f"{machine()}\n" + text_table(found, ["scheduler", "best_val_acc", "best_trial", "best_params", "trials",
                                                 "trial_epochs", "exploits", "wall_seconds", "wall_vs_first"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
