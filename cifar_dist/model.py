"""One ResNet family for CIFAR-10, described by a small spec (stem, stages, head).

Every preset (the tutorial's `seed2`/`seed3`, `resnet18`, ...) and every Ray Tune trial is a
`ModelSpec`; `build_model` turns any valid spec into an `nn.Module`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class SpecError(ValueError):
    """An architecture that cannot be built; the message names the problem."""


@dataclass
class ModelSpec:
    stem_width: int = 32
    stem_kernel: int = 3
    stem_pool: str = "none"  # none | avg | max: 3x3 stride-2 pooling after the stem
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    strides: list[int] = field(default_factory=lambda: [1, 1, 2])
    head: str = "gap"  # gap: global average pool + linear | flatten: the tutorial's flatten + linear
    stride_conv: str = "first"  # which conv of a block carries its stride (the tutorial: second)
    relu_after_add: bool = True  # the tutorial's 2-block net has no ReLU after the residual add
    conv_bias: bool = False  # the tutorial used nn.Conv2d's default bias=True
    num_classes: int = 10


def check_spec(spec: ModelSpec) -> None:
    n = len(spec.widths)
    if n == 0:
        raise SpecError("widths is empty: the model needs at least one stage")
    if len(spec.blocks) != n or len(spec.strides) != n:
        raise SpecError(f"widths, blocks and strides must have the same length, got "
                        f"{len(spec.widths)}, {len(spec.blocks)} and {len(spec.strides)}")
    if spec.stem_width <= 0 or any(w <= 0 for w in spec.widths):
        raise SpecError(f"widths must be positive, got stem {spec.stem_width} and {spec.widths}")
    if any(b <= 0 for b in spec.blocks):
        raise SpecError(f"every stage needs at least one block, got blocks {spec.blocks}")
    if any(s not in (1, 2) for s in spec.strides):
        raise SpecError(f"strides must be 1 or 2, got {spec.strides}")
    if spec.stem_kernel not in (1, 3, 5, 7):
        raise SpecError(f"stem_kernel must be 1, 3, 5 or 7, got {spec.stem_kernel}")
    for name, value, allowed in (("stem_pool", spec.stem_pool, ("none", "avg", "max")),
                                 ("head", spec.head, ("gap", "flatten")),
                                 ("stride_conv", spec.stride_conv, ("first", "second"))):
        if value not in allowed:
            raise SpecError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if spec.num_classes < 2:
        raise SpecError(f"num_classes must be >= 2, got {spec.num_classes}")


def output_size(spec: ModelSpec, input_size: int = 32) -> int:
    """Side length of the last feature map (3x3 convs/pools with padding 1 give ceil(n/stride))."""
    size = input_size
    if spec.stem_pool != "none":
        size = (size + 1) // 2
    for s in spec.strides:
        size = (size + s - 1) // s
    return size


def conv_bn(cin: int, cout: int, kernel: int, stride: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias),
                         nn.BatchNorm2d(cout))


class Block(nn.Module):
    """Basic residual block: conv-BN-ReLU-conv-BN + shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, spec: ModelSpec):
        super().__init__()
        s1, s2 = (stride, 1) if spec.stride_conv == "first" else (1, stride)
        self.conv1 = conv_bn(cin, cout, 3, s1, spec.conv_bias)
        self.conv2 = conv_bn(cout, cout, 3, s2, spec.conv_bias)
        self.shortcut = (conv_bn(cin, cout, 1, stride, spec.conv_bias)
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu_after_add = spec.relu_after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x)
        return torch.relu(out) if self.relu_after_add else out


class ResNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        check_spec(spec)
        self.spec = spec
        pool = {"none": nn.Identity(), "avg": nn.AvgPool2d(3, 2, 1), "max": nn.MaxPool2d(3, 2, 1)}
        self.stem = nn.Sequential(conv_bn(3, spec.stem_width, spec.stem_kernel, 1, spec.conv_bias),
                                  nn.ReLU(inplace=True), pool[spec.stem_pool])
        blocks, cin = [], spec.stem_width
        for width, n, stride in zip(spec.widths, spec.blocks, spec.strides):
            for i in range(n):
                blocks.append(Block(cin, width, stride if i == 0 else 1, spec))
                cin = width
        # A flat list so feature-map hooks can name every block: blocks.0, blocks.1, ...
        self.blocks = nn.Sequential(*blocks)
        if spec.head == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, spec.num_classes))
        else:
            flat = cin * output_size(spec) ** 2
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, spec.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_model(spec: ModelSpec) -> ResNet:
    return ResNet(spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def summarize(model: nn.Module, input_size: int = 32) -> str:
    """Per layer: output shape and parameters; then the totals (a torchinfo-style table)."""
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    for name, m in model.named_modules():
        if name and (not list(m.children()) or isinstance(m, Block)) and not isinstance(m, nn.Identity):
            own = sum(p.numel() for p in m.parameters())  # a Block's row sums the layers above it
            kind = "Block (sum)" if isinstance(m, Block) else type(m).__name__
            hooks.append(m.register_forward_hook(
                lambda _m, _i, o, n=name, k=kind, own=own: rows.append((n, k, str(tuple(o.shape[1:])), own))))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'layer':{width}}{'type':18}{'output shape':18}{'params':>12}", "-" * (width + 48)]
    lines += [f"{n:{width}}{t:18}{s:18}{p:>12,}" for n, t, s, p in rows]
    lines += ["-" * (width + 48), f"total parameters: {count_params(model):,}",
              f"size: {model_bytes(model) / 2**20:.2f} MB (parameters and buffers)"]
    return "\n".join(lines)
