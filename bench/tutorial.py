"""The tutorial's own training loop, reproduced faithfully as the baseline of bench/: torchvision's
CIFAR10 dataset class (PIL image per sample, ToTensor, ImageNet Normalize), a DataLoader with batch 100
and shuffling, fp32, Adam lr 1e-3, `.item()` on the loss and the accuracy every step, and the test set
evaluated after every epoch. The model is the same `seed3` network our loop trains.

Used by bench/throughput.py and bench/time_to_accuracy.py; runnable on its own:
    python -m bench.tutorial --data-dir ../shared/cifar10 --epochs 20
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torchvision
from torchvision import transforms

from bench.common import ROOT
from cifar_dist import data as D
from cifar_dist.config import resolve
from cifar_dist.model import build_model

IMAGENET = dict(mean=list(D.IMAGENET_MEAN), std=list(D.IMAGENET_STD))


def torchvision_set(split: D.Split, transform) -> torchvision.datasets.CIFAR10:
    """torchvision's CIFAR10 class over our already-read files (it only reads the python layout), so
    __getitem__ is torchvision's own: Image.fromarray(HWC uint8) -> transform."""
    ds = torchvision.datasets.CIFAR10.__new__(torchvision.datasets.CIFAR10)
    ds.root, ds.train, ds.transform, ds.target_transform = "", True, transform, None
    ds.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
    ds.targets = split.labels.tolist()
    return ds


def loaders(data_dir: str, train_subset: int = 0, test_subset: int = 0, workers: int = 0):
    cfg = resolve(["--data-dir", data_dir, "--train-subset", str(train_subset), "--test-subset", str(test_subset)])
    data = D.load_data(cfg)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(**IMAGENET)])
    train = torch.utils.data.DataLoader(torchvision_set(data.train, transform), batch_size=100, shuffle=True,
                                        num_workers=workers)
    test = torch.utils.data.DataLoader(torchvision_set(data.test, transform), batch_size=100, shuffle=False,
                                       num_workers=workers)
    return train, test


def run(data_dir: str, epochs: int, train_subset: int = 0, test_subset: int = 0, workers: int = 0, seed: int = 0,
        target: float = 0.0, on_epoch=None) -> list[dict]:
    """The tutorial's loop; per epoch: train images/s (training only) and test accuracy. Stops early once
    test accuracy reaches `target` (if given)."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(resolve(["--preset", "seed3"]).model).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_loader, test_loader = loaders(data_dir, train_subset, test_subset, workers)
    history, start = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        running_loss, correct, total, t0 = 0.0, 0, 0, time.perf_counter()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            _, predicted = outputs.max(1)
            total += labels.size(0)
            correct += predicted.eq(labels).sum().item()
        train_seconds = time.perf_counter() - t0
        model.eval()
        test_correct, test_total = 0, 0
        with torch.no_grad():
            for images, labels in test_loader:
                images, labels = images.to(device), labels.to(device)
                test_correct += model(images).argmax(1).eq(labels).sum().item()
                test_total += labels.size(0)
        m = dict(epoch=epoch + 1, train_loss=running_loss / len(train_loader), train_acc=correct / total,
                 test_acc=test_correct / test_total, images_per_second=total / train_seconds,
                 elapsed=time.perf_counter() - start)
        history.append(m)
        if on_epoch:
            on_epoch(m)
        if target and m["test_acc"] >= target:
            break
    return history


def run_script(data_dir: str, args: list[str], who: str) -> list[dict]:
    """This file as its own process (a clean process per measurement); its per-epoch history."""
    cmd = [sys.executable, "-m", "bench.tutorial", "--data-dir", data_dir, *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # ROOT, not the cwd
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if r.returncode != 0:
        raise SystemExit(f"{who}: error: the tutorial loop failed: {r.stderr.strip()[-500:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--test-subset", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the tutorial: 0)")
    p.add_argument("--target", type=float, default=0.0, help="stop at this test accuracy (0..1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    run(a.data_dir, a.epochs, a.train_subset, a.test_subset, a.workers, a.seed, a.target,
        on_epoch=lambda m: print(json.dumps(m), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
