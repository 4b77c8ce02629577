"""Compute of a run, counted (not estimated) with torch's FlopCounterMode: one image's forward and
forward+backward through the model, times the images a run trains and evaluates.

    python -m cifar_dist.flops --preset fast            # any train.py flags
"""
from __future__ import annotations

import dataclasses
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from cifar_dist.config import Config, ConfigError, resolve
from cifar_dist.model import ModelSpec, build_model, count_params


def per_image(spec: ModelSpec) -> tuple[int, int]:
    """FLOPs of one image: forward (inference) and forward + backward (training)."""
    model = build_model(dataclasses.replace(spec, bn_group=0))  # the same FLOPs, any batch
    # batch 2: BatchNorm in training mode needs more than one value
    x = torch.zeros(2, 3, spec.image_size, spec.image_size)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    forward = counter.get_total_flops() // 2
    with FlopCounterMode(display=False) as counter:
        model.train()(x).sum().backward()
    return forward, counter.get_total_flops() // 2


def tta_views(tta: str) -> int:
    return {"none": 1, "flip": 2, "flip-translate": 6}[tta]


def run_flops(cfg: Config, train_images: int, eval_images: int, steps: int | None = None) -> dict[str, int]:
    """Training FLOPs (what airbench reports: forward + backward of every trained image) and
    evaluation FLOPs (every evaluation, test-time augmentation views included). `steps`: those trained,
    where a time budget ended the last epoch part-way."""
    forward, training = per_image(cfg.model)
    steps = steps or train_images // cfg.batch_size * cfg.epochs
    evaluations = len(range(cfg.eval_every, cfg.epochs + 1, cfg.eval_every)) + (cfg.epochs % cfg.eval_every != 0)
    return dict(train_flops=training * steps * cfg.batch_size,
                eval_flops=forward * tta_views(cfg.tta) * eval_images * evaluations,
                flops_per_image_forward=forward, flops_per_image_train=training)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = resolve(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"cifar_dist.flops: error: {e}", file=sys.stderr)
        return 2
    train = cfg.train_subset or 50_000 - cfg.val_size
    flops = run_flops(cfg, train, cfg.test_subset or 10_000)
    print(f"{cfg.preset} ({count_params(build_model(cfg.model)):,} parameters), recipe {cfg.recipe}: "
          f"{cfg.epochs} epochs x {train:,} images, batch {cfg.batch_size}, tta {cfg.tta}")
    print(f"  per image: forward {flops['flops_per_image_forward'] / 1e9:.3f} GFLOP, "
          f"training (forward + backward) {flops['flops_per_image_train'] / 1e9:.3f} GFLOP")
    print(f"  training: {flops['train_flops'] / 1e15:.3f} PFLOP; evaluation: {flops['eval_flops'] / 1e15:.4f} PFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
