"""A run that loses a worker and changes its world size on the way, on real CIFAR-10, against the spread of
the same preset's uninterrupted seeds (bench.accuracy's record in bench/results/accuracy.jsonl).

    python -m bench.elastic --preset fast --seed 0 -- --data-dir ../shared/cifar10 --eval-every 8 --mixed-precision bf16

The run: `python -m launcher --nproc 2 --max-restarts 2 -- --sync-bn ...`; rank 1 is SIGKILLed --kill-after
seconds into epoch --kill-epoch (torch elastic restarts the group, which resumes from the last epoch's
checkpoint by itself); after epoch --stop-epoch the workers get SIGUSR1 (a preemption: checkpoint and
stop); then `python -m cifar_dist.train` resumes it on ONE process to the end. One line is appended to
bench/results/elastic.jsonl: its test accuracy, the uninterrupted seeds' accuracies, restarts and resumes.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.common import ROOT, append_result, machine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-epoch", type=int, default=2, help="SIGKILL rank 1 during this epoch (1-based)")
    p.add_argument("--kill-after", type=float, default=30.0, help="seconds into that epoch")
    p.add_argument("--stop-epoch", type=int, default=4, help="stop the 2-process run after this epoch")
    p.add_argument("--out", default=str(ROOT / "runs" / "elastic"))
    p.add_argument("--results", default="elastic.jsonl", help="file under bench/results/ ('' : none)")
    p.add_argument("train_args", nargs="*", help="train.py flags, after --")
    return p.parse_args()


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before {path} appeared")
        time.sleep(0.5)


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "LOCAL_RANK" in p.environ()]


def two_processes_then_one(a: argparse.Namespace, args: list[str], out: Path, log: Path) -> float:
    """The elastic run; returns its wall time."""
    t0 = time.perf_counter()
    ckpt = out / "checkpoints"
    with log.open("a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "--nproc", "2", "--max-restarts", "2", "--",
                                 *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        wait_for(ckpt / f"epoch-{a.kill_epoch - 1:04d}", proc)
        time.sleep(a.kill_after)
        victim = [p for p in workers(proc) if p.environ().get("LOCAL_RANK") == "1"]
        print(f"SIGKILL rank 1 (pid {victim[0].pid}) {a.kill_after:.0f} s into epoch {a.kill_epoch}", flush=True)
        victim[0].kill()
        wait_for(ckpt / f"epoch-{a.stop_epoch:04d}", proc)
        print(f"SIGUSR1 to the workers after epoch {a.stop_epoch}", flush=True)
        for p in workers(proc):
            p.send_signal(signal.SIGUSR1)
        if proc.wait() != 0:
            raise RuntimeError(f"the 2-process run failed (exit {proc.returncode}); see {log}")
        print("resuming on 1 process", flush=True)
        code = subprocess.call([sys.executable, "-m", "cifar_dist.train", *args], cwd=ROOT, stdout=f,
                               stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"the 1-process resume failed (exit {code}); see {log}")
    return time.perf_counter() - t0


def uninterrupted(preset: str, train_args: list[str]) -> dict | None:
    """bench.accuracy's latest record of the preset with these flags (less this bench's own)."""
    path = ROOT / "bench" / "results" / "accuracy.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    same = [r for r in records if r["preset"] == preset and r["n"] > 1 and r["train_args"] == train_args]
    return same[-1] if same else None


def main() -> int:
    a = parse_args()
    if not 2 <= a.kill_epoch <= a.stop_epoch:
        print(f"bench.elastic: error: --kill-epoch must be in 2..--stop-epoch (a checkpoint before it to resume "
              f"from), got {a.kill_epoch}", file=sys.stderr)
        return 2
    out = Path(a.out) / f"{a.preset}-seed-{a.seed}"
    if out.exists():
        print(f"bench.elastic: error: {out} exists; remove it or pass another --out", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["--preset", a.preset, *a.train_args, "--sync-bn", "--seed", str(a.seed), "--output-dir", str(out)]
    wall = two_processes_then_one(a, args, out, out.parent / f"{out.name}.log")
    s = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = uninterrupted(a.preset, a.train_args)
    record = dict(preset=a.preset, seed=a.seed, train_args=a.train_args, test_acc=round(100 * s["test_acc"], 2),
                  epochs=[m["epoch"] for m in metrics], resumes=s["resumes"], world_size_at_end=s["world_size"],
                  wall_seconds=round(wall), uninterrupted=ref and ref["test_acc"],
                  within_spread=ref is not None and min(ref["test_acc"]) <= 100 * s["test_acc"] <= max(ref["test_acc"]))
    spread = f"{min(ref['test_acc'])}–{max(ref['test_acc'])} % over {ref['n']} seeds" if ref else "no record"
    print(f"\n{a.preset}, seed {a.seed}, 2 processes (rank 1 killed in epoch {a.kill_epoch}, restarted), "
          f"then 1 process from epoch {a.stop_epoch}: test accuracy {record['test_acc']:.2f} % "
          f"(uninterrupted: {spread}); epochs {record['epochs']}; {wall:.0f} s on {machine()}")
    if a.results:
        print(f"appended to {append_result(a.results, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
