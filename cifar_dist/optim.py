"""Optimisation: parameter groups, Muon, learning-rate schedules and airbench's Lookahead EMA."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch

from cifar_dist.config import Config
from cifar_dist.model import ResNet


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One parameter group per kind: conv weights, biases, BatchNorm (lr x norm_lr_scale), the head
    (lr scaled down with its fan-in for SGD), a whitening stem's bias (frozen later by its lr factor).
    Weight decay on conv/linear weights only; with decay_all on everything, at the same rate per step.
    With Muon the trained conv filters are a group of their own (its lr, no weight decay)."""
    head, stem = cast(ResNet, model).head[-1], cast(ResNet, model).stem[0]  # a whitening stem: its conv
    assert isinstance(head, torch.nn.Linear)
    head_scale = cfg.head_lr_scale or (min(1.0, 512 / head.in_features) if cfg.optimizer != "adam" else 1.0)
    head_ids = {id(p) for p in head.parameters()}
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    stem_bias = cast(torch.nn.Conv2d, stem).bias if cfg.model.stem == "whiten" else None

    def kind(p: torch.nn.Parameter) -> str:
        if id(p) in head_ids:
            return "head" if p.ndim > 1 else "head_bias"
        if p is stem_bias:
            return "stem_bias"
        if cfg.optimizer == "muon" and p.ndim == 4:
            return "filters"
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
    nesterov = cfg.nesterov and cfg.momentum > 0
    if cfg.optimizer == "muon":
        filters = [p for p in model.parameters() if p.requires_grad and kind(p) == "filters"]
        groups.append(dict(params=filters, weight_decay=0.0, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                           nesterov=cfg.nesterov and cfg.muon_momentum > 0, muon=True, name="filters"))
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, foreach=True)


def orthogonalize(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Roughly U V^T of g = U S V^T, by a quintic Newton-Schulz iteration (Jordan 2024). Its coefficients
    push small singular values up fast rather than converging: after 3 steps they lie around 0.5-1.5,
    which trains as well as the exact U V^T at a fraction of an SVD's cost. In fp32 on every device, so a
    config trains the same way on CPU and GPU (airbench does this in bf16 on its GPU)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / (g.norm() + 1e-7)  # the top singular value <= 1
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon (Jordan 2024) on the groups marked `muon`, SGD on the rest; both with (Nesterov) momentum.
    A Muon step keeps each filter bank at norm sqrt(output channels) (so weight decay has no role there)
    and moves it by the orthogonalised momentum of its gradient, reshaped to output channels x the rest:
    every direction of the filter bank moves by about the same amount, whatever its gradient's scale."""

    def __init__(self, groups: list[dict], lr: float, momentum: float, nesterov: bool = True):
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]  # no closure
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if group["muon"] or not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    g = orthogonalize(g.reshape(len(g), -1)).view_as(p).to(p.dtype)
                p.add_(g, alpha=-lr)


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


def lr_factors(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
               total_steps: int | None = None) -> list[Callable[[int], float]]:
    """The schedule for every group, over the run's epochs or the `total_steps` a time budget planned; a
    whitening stem's bias stops (lr 0) after whiten_bias_epochs, on the way there following the schedule
    or a linear decay of its own."""
    factor = lr_factor(cfg, total_steps or steps_per_epoch * cfg.epochs)
    frozen_from = cfg.whiten_bias_epochs * steps_per_epoch

    def stem_bias(step: int) -> float:
        if step >= frozen_from:
            return 0.0
        return 1 - step / frozen_from if cfg.whiten_bias_lr == "linear" else factor(step)

    return [stem_bias if g.get("name") == "stem_bias" else factor for g in optimizer.param_groups]


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                   total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(cfg, optimizer, steps_per_epoch, total_steps))


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
