"""The real CIFAR-10 written out as folders of PNG pictures (train/<class>/<index>.png beside
test/<class>/<index>.png, the official order in the names), then read back by `--dataset folder`: the
pixels, labels and order equal the binary reader's; the first decode and the cached start-up timed; and
one epoch of the same run on both, whose weights are compared. One line appended to
bench/results/folders.jsonl.

    python -m bench.folders --data-dir ../shared/cifar10 --out /tmp/cifar10-png
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import ROOT, append_result
from cifar_dist import folders
from cifar_dist.data import Split, load_cifar10


def write_folders(split: Split, classes: list[str], root: Path) -> None:
    """Each image as root/<class>/<its index, 5 digits>.png."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    pixels = split.images.permute(0, 2, 3, 1).numpy()
    for i, (image, label) in enumerate(zip(pixels, split.labels.tolist())):
        Image.fromarray(np.ascontiguousarray(image)).save(root / classes[label] / f"{i:05d}.png")


def timed_load(root: Path, cache: Path) -> tuple[float, tuple]:
    t0 = time.monotonic()
    loaded = folders.load(root, 32, 0.2, 0, False, cache)
    return time.monotonic() - t0, loaded


def one_epoch(args: list[str]) -> str:
    """The weights' digest after one epoch of `fast` on the given data flags, in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cifar_dist.train", "--preset", "fast", "--epochs", "1", "--mixed-precision", "no",
               "--output-dir", tmp, *args]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bench.folders: error: {' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
        return json.loads((Path(tmp) / "summary.json").read_text())["rank_weight_digests"][0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 in its binary or python layout")
    p.add_argument("--out", required=True, help="where the PNG folders are written")
    p.add_argument("--results", default="folders.jsonl", help="file under bench/results/ ('': none)")
    a = p.parse_args()
    train, test, classes = load_cifar10(Path(a.data_dir))
    out = Path(a.out)
    t0 = time.monotonic()
    write_folders(train, classes, out / "train")
    write_folders(test, classes, out / "test")
    written_s = time.monotonic() - t0
    with tempfile.TemporaryDirectory() as cache:
        first_s, (tr, te, names, note) = timed_load(out, Path(cache))
        cached_s, _ = timed_load(out, Path(cache))
    same = dict(classes=names == classes, train=torch.equal(tr[0], train.images) and torch.equal(tr[1], train.labels),
                test=torch.equal(te[0], test.images) and torch.equal(te[1], test.labels))
    digests = dict(binary=one_epoch(["--data-dir", a.data_dir]), folder=one_epoch(["--dataset", "folder", "--data-dir",
                                                                                    str(out)]))
    record = dict(images=len(train) + len(test), written_s=round(written_s, 1), first_decode_s=round(first_s, 1),
                  cached_s=round(cached_s, 2), same=same, same_weights=digests["binary"] == digests["folder"],
                  note=note)
    print(json.dumps(record, indent=1))
    if a.results:
        print(f"appended to {append_result(a.results, record)}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
