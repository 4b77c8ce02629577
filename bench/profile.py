"""Where a training run's time goes: torch.profiler around one short run of our real loop (data on the
device, augmentation, the step, the lookahead, the evaluation), the top operators by device time (GPU) or
CPU time, and the host-device syncs. Any train.py flags after --.

    python -m bench.profile --data-dir ../shared/cifar10 --preset fast
    python -m bench.profile --dataset synthetic --preset fast -- --train-subset 2000
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import machine
from cifar_dist.config import resolve
from cifar_dist.train import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--preset", default="fast")
    p.add_argument("--images", type=int, default=10_000, help="training images of the profiled epoch")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("train_args", nargs="*", help="train.py flags, after --")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--preset", a.preset, "--dataset", a.dataset, "--data-dir", a.data_dir, "--epochs", "1",
                "--train-subset", str(a.images), "--test-subset", "2000", "--output-dir", tmp, *a.train_args]
        train(resolve([*args, "--output-dir", f"{tmp}/warmup"]))  # kernels built and tuned before the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            train(resolve([*args, "--output-dir", f"{tmp}/profiled"]))
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"{a.preset}, one epoch of {a.images} images and an evaluation, {machine()}; top operators by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows))
    sync_ops = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize")
    syncs = [e for e in prof.key_averages() if e.key in sync_ops]
    print("host-device syncs: " + (", ".join(f"{e.key} x{e.count}" for e in syncs) or "none recorded"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
