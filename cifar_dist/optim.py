"""Optimisation: parameter groups, learning-rate schedules and airbench's Lookahead EMA."""
from __future__ import annotations

import math
from typing import Callable

import torch

from cifar_dist.config import Config


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One parameter group per kind: conv weights, biases, BatchNorm (lr x norm_lr_scale), the head
    (lr scaled down with its fan-in for SGD), a whitening stem's bias (frozen later by its lr factor).
    Weight decay on conv/linear weights only; with decay_all on everything, at the same rate per step."""
    head = model.head[-1]
    head_scale = cfg.head_lr_scale or (min(1.0, 512 / head.in_features) if cfg.optimizer == "sgd" else 1.0)
    head_ids = {id(p) for p in head.parameters()}
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    stem_bias = model.stem[0].bias if cfg.model.stem == "whiten" else None

    def kind(p: torch.nn.Parameter) -> str:
        if id(p) in head_ids:
            return "head" if p.ndim > 1 else "head_bias"
        if p is stem_bias:
            return "stem_bias"
        return "norm" if id(p) in norm_ids else "weights" if p.ndim > 1 else "biases"

    scales = dict(weights=1.0, biases=1.0, norm=cfg.norm_lr_scale, head=head_scale, head_bias=head_scale, stem_bias=1.0)
    groups = []
    for name, scale in scales.items():
        params = [p for p in model.parameters() if p.requires_grad and kind(p) == name]
        decay = cfg.weight_decay / scale if cfg.decay_all else cfg.weight_decay if name in ("weights", "head") else 0.0
        if params:
            groups.append(dict(params=params, weight_decay=decay, lr=cfg.lr * scale, name=name))
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           foreach=True)


def lr_factor(cfg: Config, total_steps: int) -> Callable[[int], float]:
    warm = int(cfg.warmup * total_steps)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm:
            return cfg.lr_start + (1 - cfg.lr_start) * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "onecycle":
            return 1.0 - t * (1 - cfg.lr_end)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def lr_factors(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> list[Callable[[int], float]]:
    """The schedule for every group; a whitening stem's bias stops (lr 0) after whiten_bias_epochs."""
    factor = lr_factor(cfg, steps_per_epoch * cfg.epochs)
    frozen_from = cfg.whiten_bias_epochs * steps_per_epoch

    def stem_bias(step: int) -> float:
        return factor(step) if step < frozen_from else 0.0

    return [stem_bias if g.get("name") == "stem_bias" else factor for g in optimizer.param_groups]


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(cfg, optimizer, steps_per_epoch))


class Lookahead:
    """airbench's lookahead EMA: every 5 steps the EMA moves toward the weights and the weights jump
    to the EMA. Its decay rises as 0.95^5 * progress^3 (early training is barely held back); at the
    last step the weights become the EMA. BatchNorm running statistics are averaged too."""

    def __init__(self, model: torch.nn.Module, total_steps: int, every: int = 5):
        self.tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}  # views of the weights
        self.ema = {k: v.detach().clone() for k, v in self.tensors.items()}
        self.total, self.every = total_steps, every

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every and step < self.total:
            return
        decay = 1.0 if step >= self.total else 0.95 ** 5 * (step / self.total) ** 3
        for k, v in self.tensors.items():
            self.ema[k].lerp_(v, 1 - decay)
            v.copy_(self.ema[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.ema.items()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        for k, v in self.ema.items():
            v.copy_(d[k])
