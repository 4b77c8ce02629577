"""Training images/s: the tutorial's loop (bench/tutorial.py) against ours (cifar_dist/train.py) on
the same `seed3` network and machine, interleaved round by round so both see the same machine state;
ours both as `python -m cifar_dist.train` and as the README's `accelerate launch cifar_dist/train.py`
(no thread count, no precision flag: what a user types), in fp32 and in the precision `auto` chooses;
then our loop for every preset, fp32 vs bf16, eager vs torch.compile; then the ceiling: `seed3`'s
forward + backward + step alone on random tensors (no data, augmentation or metrics), which bounds what
any eager loop can reach on this machine (compiled kernels can pass it). One line appended to
bench/results/throughput.jsonl.

    python -m bench.throughput --data-dir ../shared/cifar10
    python -m bench.throughput --data-dir ../shared/cifar10 --rounds 1 --presets seed3 --no-compile

Each measurement is its own process. Ours trains 2 epochs over --images images and reports the second
(warm-up and compilation excluded); the tutorial's loop is timed over its second pass too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, append_result, machine
from bench.tutorial import run_script
from cifar_dist.config import resolve
from cifar_dist.recipes import PRESETS
from cifar_dist.tables import text_table

# How our loop is started: as a module, or as the README's main job command.
LAUNCH = {"python -m": [sys.executable, "-m", "cifar_dist.train"],
          "accelerate launch": ["accelerate", "launch", "cifar_dist/train.py"]}


def ours(data_dir: str, images: int, preset: str, precision: str, compiled: bool, extra: list[str],
         launch: str = "python -m", test_images: int = 500) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*LAUNCH[launch], "--preset", preset, "--data-dir", data_dir,
               "--train-subset", str(images), "--test-subset", str(test_images), "--epochs", "2", "--mixed-precision",
               precision, "--compile" if compiled else "--no-compile", "--output-dir", f"{tmp}/run", *extra]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bench.throughput: error: {' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        return rows[-1]["images_per_second"]


def tutorial(data_dir: str, images: int, workers: int, test_images: int = 500) -> float:
    history = run_script(data_dir, ["--epochs", "2", "--train-subset", str(images), "--test-subset", str(test_images),
                                    "--workers", str(workers)], "bench.throughput")
    return history[-1]["images_per_second"]


def ceiling(preset: str, batch: int, bf16: bool, seconds: float = 10.0, spec=None) -> float:
    """Images/s of the model's training step alone (the preset's, or `spec`): channels-last, SGD, random
    tensors on the device."""
    import torch

    from cifar_dist.model import build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(spec or resolve(["--preset", preset]).model).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def step() -> None:
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += 1
    sync()
    return done * batch / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="", help="CIFAR-10 folder (default $CIFAR10_DIR, then ./data)")
    p.add_argument("--images", type=int, default=5000, help="training images per measured epoch")
    p.add_argument("--test-images", type=int, default=500, help="test images each run evaluates (not timed)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved tutorial/ours rounds")
    p.add_argument("--workers", type=int, default=0, help="the tutorial DataLoader's workers")
    p.add_argument("--presets", default=",".join(PRESETS), help="presets for the second table ('' : skip it)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure torch.compile in the second table")
    p.add_argument("--ceiling-seconds", type=float, default=10.0, help="seconds per ceiling measurement")
    p.add_argument("--results", default="throughput.jsonl", help="file under bench/results/ (or an absolute path)")
    a = p.parse_args()
    pairs, t_med, o_med = side_by_side(a)
    emulated = emulated_bf16()
    if emulated:
        print(f"bf16 not measured below: {emulated}\n")
    grid = presets_table(a, bf16=not emulated)
    bound = ceilings(a, t_med, bf16=not emulated)
    path = append_result(a.results, dict(images=a.images, test_images=a.test_images, tutorial_workers=a.workers,
                                         rounds=pairs, median_tutorial=t_med, median_ours=o_med,
                                         ratio=round(o_med / t_med, 2), presets=grid, ceiling=bound,
                                         bf16_not_measured=emulated or None))
    print(f"appended to {path}")
    return 0


def side_by_side(a: argparse.Namespace) -> tuple[list[dict], float, float]:
    """The tutorial's loop and ours on seed3, interleaved round by round: ours in fp32 as a module and
    through accelerate launch, and through accelerate launch with the default precision (auto); the medians."""
    pairs: list[dict[str, Any]] = []
    cols = ["round", "tutorial", "ours", "accelerate launch", "accelerate launch, auto", "ratio"]
    for i in range(a.rounds):
        t = tutorial(a.data_dir, a.images, a.workers, a.test_images)
        o = ours(a.data_dir, a.images, "seed3", "no", False, [], test_images=a.test_images)
        launched = ours(a.data_dir, a.images, "seed3", "no", False, [], "accelerate launch", a.test_images)
        auto = ours(a.data_dir, a.images, "seed3", "auto", False, [], "accelerate launch", a.test_images)
        pairs.append({"round": i + 1, "tutorial": round(t), "ours": round(o), "accelerate launch": round(launched),
                      "accelerate launch, auto": round(auto), "ratio": f"{o / t:.2f}x"})
        print(text_table(pairs[-1:], cols), flush=True)
    med = {c: statistics.median(r[c] for r in pairs) for c in cols[1:-1]}
    t_med, o_med = med["tutorial"], med["ours"]
    print(f"\nseed3, {a.images} images per epoch, images/s (fp32 unless 'auto'), {machine()}:")
    print(text_table(pairs, cols))
    print(f"median: tutorial {t_med:.0f} img/s, ours {o_med:.0f} img/s ({o_med / t_med:.2f}x); accelerate launch "
          f"{med['accelerate launch']:.0f} img/s ({med['accelerate launch'] / o_med:.2f}x python -m), with the "
          f"default precision {med['accelerate launch, auto']:.0f} img/s\n")
    return pairs, t_med, o_med


def emulated_bf16() -> str:
    """Why bf16 is not worth measuring here ('' where it is): a CPU whose bf16 is emulated (no AVX512-BF16
    or AMX), as the precision probe's first look finds it. Its runs would take ~10x fp32's, for a column
    that only says so (a `seed2` row alone ran past 4 minutes on an AVX2 EPYC)."""
    import torch

    from cifar_dist import machine

    if torch.cuda.is_available():
        return ""
    look = machine.measure(resolve(["--preset", "seed3"]), machine.PROBE_FIRST_BATCH)
    if not machine.emulated(look["speedup"]):
        return ""
    return (f"this CPU's bf16 is emulated (torch CPU capability {torch.backends.cpu.get_cpu_capability()}): a seed3 "
            f"step ({machine.measured_on(look)}) ran at {look['speedup']:.2f}x fp32's speed")


def presets_table(a: argparse.Namespace, bf16: bool = True) -> list[dict]:
    """Our loop for every preset (its own recipe and batch), fp32/bf16 (None where not measured), eager
    (and compiled)."""
    grid = []
    for preset in [x for x in a.presets.split(",") if x]:
        row: dict[str, Any] = dict(preset=preset)
        for precision in ("no", "bf16"):
            for compiled in ([False, True] if a.compile else [False]):
                key = f"{'fp32' if precision == 'no' else precision}{'+compile' if compiled else ''}"
                if precision == "bf16" and not bf16:
                    row[key] = None  # emulated here: not measured (main says why)
                    continue
                n = a.images if preset != "resnet18" else max(1024, a.images // 5)  # resnet18 is ~20x the work
                n = max(n, 3 * resolve(["--preset", preset]).batch_size)  # at least 3 steps of the recipe's batch
                ips = ours(a.data_dir, n, preset, precision, compiled, [], test_images=a.test_images)
                row[key] = round(ips)
                print(f"  {preset} {precision} compile={compiled}: {ips:.0f} img/s", flush=True)
        grid.append(row)
    if grid:
        print(f"\nour loop, training images/s, each preset's own recipe (batch size), {machine()}:")
        print(text_table(grid, list(grid[0])))
    return grid


def ceilings(a: argparse.Namespace, t_med: float, bf16: bool = True) -> list[dict]:
    """seed3's bare training step at batch 100 and 256, fp32 and bf16 (None where not measured), against
    the tutorial's median."""
    bound = []
    for batch in (100, 256):
        row: dict[str, Any] = dict(batch=batch, fp32=round(ceiling("seed3", batch, False, a.ceiling_seconds)),
                                   bf16=round(ceiling("seed3", batch, True, a.ceiling_seconds)) if bf16 else None)
        row["best / tutorial"] = f"{max(row['fp32'], row['bf16'] or 0) / t_med:.2f}x"
        bound.append(row)
    print(f"\nceiling: seed3 training step alone (random tensors, channels-last), images/s, {machine()}:")
    print(text_table(bound, ["batch", "fp32", "bf16", "best / tutorial"]))
    return bound


if __name__ == "__main__":
    sys.exit(main())
