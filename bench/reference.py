"""Ours beside the reference we follow, on the same GPU in one invocation: airbench's own code (the PyPI
package `airbench`: train94, the legacy airbench94; train96, airbench96) against our `fast` / `best`
through the README's `accelerate launch cifar_dist/train.py` (default precision: auto). A table of test
accuracy and seconds per run (each side's own clock: training and evaluation, start-up excluded), the
means, and ours/theirs. One line appended to bench/results/reference.jsonl (or --results).

    python -m bench.reference --data-dir ../shared/cifar10 --pair 94 --runs 5
    python -m bench.reference --data-dir ../shared/cifar10 --pair 96 --runs 1
    python -m bench.reference --data-dir ../shared/cifar10 --dry-run   # no GPU: the data files and the plan

airbench reads cifar10/train.pt and test.pt from its working directory and downloads CIFAR-10 when they
are missing: they are written here from our data first, so it never does (a GPU machine may have no
internet). Its runs go after one warm-up run of its own, ours after a 1-epoch warm-up run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import ROOT, append_result, machine
from cifar_dist import data as D
from cifar_dist.config import resolve
from cifar_dist.tables import text_table

# airbench's function, and the train.py flags of ours beside it. The package's train94 is airbench94 (legacy,
# SGD + lookahead; `--recipe fast-sgd` is ours of it); `fast` now trains with Muon after airbench94_muon,
# which the package does not hold: the pair compares the two ways to 94 %, each at its own compute.
PAIRS = {"94": ("train94", ["--preset", "fast"]), "96": ("train96", ["--preset", "best"])}
LAUNCH = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]


def write_airbench_data(data_dir: str, workdir: Path) -> dict[str, tuple]:
    """cifar10/{train,test}.pt as airbench saves them: uint8 N x 32 x 32 x 3 images, int64 labels, class names."""
    data = D.load_data(resolve(["--data-dir", data_dir]))
    (workdir / "cifar10").mkdir(parents=True, exist_ok=True)
    shapes = {}
    for name, split in (("train", data.train), ("test", data.test)):
        images = split.images.permute(0, 2, 3, 1).contiguous()
        torch.save(dict(images=images, labels=split.labels.long(), classes=list(data.classes)),
                   workdir / "cifar10" / f"{name}.pt")
        shapes[name] = tuple(images.shape)
    return shapes


def airbench_runs(which: str, runs: int, workdir: Path) -> list[dict]:
    """airbench's own function in this process (after its warm-up run); each run's TTA accuracy and seconds
    as it reports them (its final table row)."""
    import airbench

    train = getattr(airbench, PAIRS[which][0])
    os.chdir(workdir)
    with contextlib.redirect_stdout(io.StringIO()):
        train(run=-1)  # airbench's warm-up: cuDNN autotuning, not counted
    results = []
    for run in range(runs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            train(run=run)
        results.append(dict(side="airbench", run=run, **last_row(buf.getvalue())))
        print(text_table(results[-1:], ["side", "run", "acc", "seconds"]), flush=True)
    return results


# airbench's printed columns (airbench.utils.logging_columns_list): its header is printed on run 0 only.
AIRBENCH_COLUMNS = ["run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds"]


def last_row(printed: str) -> dict[str, float]:
    """tta_val_acc and total_time_seconds from the final ('eval') row of airbench's printed table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in printed.splitlines()
            if line.startswith("|")]
    final = [r for r in rows if len(r) == len(AIRBENCH_COLUMNS) and r[1] == "eval"][-1]
    cell = dict(zip(AIRBENCH_COLUMNS, final))
    return dict(acc=float(cell["tta_val_acc"]), seconds=float(cell["total_time_seconds"]))


def our_runs(which: str, runs: int, data_dir: str, workdir: Path, dry_run: bool) -> list[dict]:
    """Our run through accelerate launch per seed, after a 1-epoch warm-up run; summary.json's numbers."""
    flags = PAIRS[which][1]
    commands = [[*LAUNCH, "cifar_dist/train.py", *flags, "--epochs", "1", "--data-dir", data_dir,
                 "--output-dir", str(workdir / "ours-warmup")]]
    commands += [[*LAUNCH, "cifar_dist/train.py", *flags, "--seed", str(seed), "--data-dir", data_dir,
                  "--output-dir", str(workdir / f"ours-{seed}")] for seed in range(runs)]
    if dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return []
    results = []
    for seed, cmd in enumerate(commands, start=-1):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bench.reference: error: {shlex.join(cmd)} failed: {r.stderr.strip()[-500:]}")
        if seed >= 0:
            s = json.loads((workdir / f"ours-{seed}" / "summary.json").read_text())
            results.append(dict(side="ours", run=seed, acc=s["test_acc"], seconds=s["total_seconds"],
                                precision=s["mixed_precision"]))
            print(text_table(results[-1:], ["side", "run", "acc", "seconds", "precision"]), flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="", help="CIFAR-10 folder (default $CIFAR10_DIR, then ./data)")
    p.add_argument("--pair", choices=sorted(PAIRS), default="94", help="airbench94 vs fast, or airbench96 vs best")
    p.add_argument("--runs", type=int, default=5, help="runs of each side")
    p.add_argument("--workdir", default="", help="where the data files and our runs go (default: a temporary folder)")
    p.add_argument("--dry-run", action="store_true",
                   help="write airbench's data files, print our commands, run nothing")
    p.add_argument("--results", default="reference.jsonl", help="file under bench/results/ (or an absolute path)")
    a = p.parse_args()
    if a.runs < 1:
        p.error(f"--runs must be at least 1, got {a.runs}")
    if not a.dry_run and not torch.cuda.is_available():
        p.error("airbench needs a CUDA GPU; use --dry-run to check the rest here")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.workdir or tmp).resolve()
        shapes = write_airbench_data(a.data_dir, workdir)
        print(f"airbench data: {workdir / 'cifar10'} (train {shapes['train']}, test {shapes['test']}, uint8)")
        ours = our_runs(a.pair, a.runs, a.data_dir, workdir, a.dry_run)
        if a.dry_run:
            return 0
        theirs = airbench_runs(a.pair, a.runs, workdir)
    report(a, ours, theirs)
    return 0


def report(a: argparse.Namespace, ours: list[dict], theirs: list[dict]) -> None:
    means = {side: dict(acc=statistics.mean(r["acc"] for r in rs), seconds=statistics.mean(r["seconds"] for r in rs))
             for side, rs in (("ours", ours), ("airbench", theirs))}
    print(f"\n{PAIRS[a.pair][1][1]} vs airbench{a.pair}, {a.runs} run(s) each, on {machine()}:")
    print(text_table([*theirs, *ours], ["side", "run", "acc", "seconds", "precision"]))
    ratio = means["ours"]["seconds"] / means["airbench"]["seconds"]
    print(f"mean: ours {100 * means['ours']['acc']:.2f} % in {means['ours']['seconds']:.1f} s, airbench "
          f"{100 * means['airbench']['acc']:.2f} % in {means['airbench']['seconds']:.2f} s: "
          f"ours/theirs {ratio:.2f}x time")
    path = append_result(a.results, dict(pair=a.pair, runs=[*theirs, *ours], means=means, time_ratio=round(ratio, 2)))
    print(f"appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
