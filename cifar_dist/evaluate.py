"""Evaluation: loss, accuracy and confusion matrix over a split, with test-time augmentation."""
from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from cifar_dist import data as D
from cifar_dist.config import Config


def evaluate(model: torch.nn.Module, split: D.Split, norm: D.Normalize, cfg: Config,
             accelerator: Accelerator) -> tuple[float, float, torch.Tensor]:
    """Loss, accuracy and confusion matrix (rows: true class) over a whole eval split, each image
    counted once across ranks."""
    model.eval()
    k = cfg.model.num_classes
    loss = torch.zeros(1, device=accelerator.device, dtype=torch.float64)
    confusion = torch.zeros(k * k, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for x, y in D.eval_batches(split, cfg.eval_batch_size, accelerator.process_index, accelerator.num_processes):
            logits = predict(model, norm(x), cfg.tta)
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
            confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k).double()
    loss, confusion = accelerator.reduce(torch.cat([loss, confusion]), "sum").split([1, k * k])
    model.train()
    count = confusion.sum().item()
    matrix = confusion.view(k, k)
    return loss.item() / max(count, 1), matrix.diagonal().sum().item() / max(count, 1), matrix


def predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits, averaged over test-time augmentations: flip averages with the mirror image;
    flip-translate (airbench's 6 views) gives that half the weight and the mirrored pair of each
    1-pixel diagonal shift (up-left, down-right) a quarter each."""
    if tta == "none":
        return model(x).float()
    logits = 0.5 * (model(x).float() + model(x.flip(-1)).float())
    if tta == "flip-translate":
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [predict(model, view, "flip") for view in (padded[..., :h, :w], padded[..., 2:, 2:])]
        return 0.5 * logits + 0.25 * (shifted[0] + shifted[1])
    return logits
