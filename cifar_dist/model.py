"""One ResNet family for CIFAR-10, described by a small spec (stem, stages, head, input size).

Every preset (the tutorial's `seed2`/`seed3`, `resnet18`, the airbench-shaped `fast`, ...) and every
Ray Tune trial is a `ModelSpec`; `build_model` turns any valid spec into an `nn.Module`.

Two stage forms: `resnet` (blocks, the first one strided) and `convpool` (conv -> 2x2 max-pool ->
BN -> activation, then 0..n blocks: the ResNet-9 / airbench shape). Blocks are `basic` (residual,
two convs) or `plain` (one conv-BN-activation, no shortcut: airbench's second conv).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cifar_dist.settings import check_choices, setting
from cifar_dist.tables import text_table


class SpecError(ValueError):
    """An architecture that cannot be built; the message names the problem."""


MIN_IMAGE, MAX_IMAGE = 8, 512  # --image-size: below 8 no preset keeps a feature map; above, use another tool
# A flatten head's linear layer has channels x side x side inputs: the tutorial's seed2 has 32,768 at 32x32.
# At 4x that (its 64x64) it still trains; beyond, the head would hold most of the network's weights.
MAX_FLATTEN = 131_072


@dataclass
class ModelSpec:
    stem_width: int = setting(32, "channels of the stem conv (a whitening stem: 2*3*k*k)")
    stem_kernel: int = setting(3, "kernel size of the stem conv")
    stem_pool: Literal["none", "avg", "max"] = setting("none", "3x3 stride-2 pooling after the stem")
    widths: list[int] = setting([32, 64, 128], "channels of each stage, e.g. 64,128,256")
    blocks: list[int] = setting([1, 1, 1], "blocks per stage, e.g. 2,2,2 (convpool stages: 0 or more)")
    strides: list[int] = setting([1, 1, 2], "stride of each stage (1 or 2), e.g. 1,2,2")
    head: Literal["gap", "flatten", "max"] = setting(
        "gap", "global average pool, the tutorial's flatten, or global max pool, then a linear layer")
    stride_conv: Literal["first", "second"] = setting("first", "which conv of a block carries its stride "
                                                               "(the tutorial: second)")
    relu_after_add: bool = setting(True, "activation after each residual add (the tutorial's 2-block net: none)")
    conv_bias: bool = setting(False, "bias in convolutions (the tutorial: nn.Conv2d's default, on)")
    num_classes: int = setting(10, "number of classes (default: the dataset's, 10 or 100)")
    image_size: int = setting(32, "side of the square RGB images the network takes (CIFAR: 32; a folder of your "
                                  "own pictures is prepared at this size)")
    stem: Literal["conv", "whiten"] = setting("conv", "conv-BN-act, or a frozen patch-whitening conv set from "
                                                      "the data, then act")
    stage: Literal["resnet", "convpool"] = setting("resnet", "strided blocks, or conv, 2x2 max-pool, BN, act, "
                                                             "then 0..n blocks (see the module docstring)")
    block: Literal["basic", "plain"] = setting("basic", "residual two-conv block, or conv-BN-act without shortcut")
    act: Literal["relu", "gelu"] = setting("relu", "activation function")
    bn_momentum: float = setting(0.1, "BatchNorm running-stat momentum (PyTorch's convention: weight of the new batch)")
    bn_eps: float = setting(1e-5, "BatchNorm epsilon")
    bn_weight: bool = setting(True, "learnable BatchNorm scales (off: fixed at 1, only the shifts learn; airbench)")
    bn_group: int = setting(0, "BatchNorm statistics over each N consecutive training images (ghost batch norm): "
                               "then no micro-batch or world size changes a step; 0: over the whole micro-batch")
    head_bias: bool = setting(True, "bias in the final linear layer")
    logit_scale: float = setting(1.0, "multiply the logits by this (airbench: 1/9)")
    dirac_init: bool = setting(False, "3x3 convs start as identity on their first input channels")


def check_spec(spec: ModelSpec) -> None:
    n = len(spec.widths)
    if n == 0:
        raise SpecError("widths is empty: the model needs at least one stage")
    if len(spec.blocks) != n or len(spec.strides) != n:
        raise SpecError(f"widths, blocks and strides must have the same length, got "
                        f"{len(spec.widths)}, {len(spec.blocks)} and {len(spec.strides)}")
    if spec.stem_width <= 0 or any(w <= 0 for w in spec.widths):
        raise SpecError(f"widths must be positive, got stem {spec.stem_width} and {spec.widths}")
    check_choices(spec, SpecError)
    if any(b < (0 if spec.stage == "convpool" else 1) for b in spec.blocks):
        raise SpecError("every stage needs at least one block (convpool stages: zero or more), "
                        f"got blocks {spec.blocks}")
    if any(s not in (1, 2) for s in spec.strides):
        raise SpecError(f"strides must be 1 or 2, got {spec.strides}")
    if spec.stem == "whiten":
        if spec.stem_kernel not in (1, 2, 3):
            raise SpecError(f"a whitening stem_kernel must be 1, 2 or 3, got {spec.stem_kernel}")
        if spec.stem_width != 2 * 3 * spec.stem_kernel ** 2:
            need = 2 * 3 * spec.stem_kernel ** 2
            raise SpecError(f"a whitening stem has 2*3*k*k channels: stem_width must be {need} "
                            f"for stem_kernel {spec.stem_kernel}, got {spec.stem_width}")
    elif spec.stem_kernel not in (1, 3, 5, 7):
        raise SpecError(f"stem_kernel must be 1, 3, 5 or 7, got {spec.stem_kernel}")
    if not 0 < spec.bn_momentum <= 1 or not 0 < spec.bn_eps < 1:
        raise SpecError(f"bn_momentum must be in (0, 1] and bn_eps in (0, 1), got {spec.bn_momentum} and {spec.bn_eps}")
    if spec.bn_group < 0:
        raise SpecError(f"bn_group must be >= 0, got {spec.bn_group}")
    if not spec.logit_scale > 0:
        raise SpecError(f"logit_scale must be positive, got {spec.logit_scale}")
    if spec.num_classes < 2:
        raise SpecError(f"num_classes must be >= 2, got {spec.num_classes}")
    if not MIN_IMAGE <= spec.image_size <= MAX_IMAGE:
        raise SpecError(f"image_size must be between {MIN_IMAGE} and {MAX_IMAGE}, got {spec.image_size}")
    side = output_size(spec)
    if side < 1:
        raise SpecError(f"the strides {spec.strides} shrink a {spec.image_size}x{spec.image_size} image to nothing")
    if spec.head == "flatten" and head_inputs(spec) > MAX_FLATTEN:
        raise SpecError(f"a flatten head cannot take {spec.image_size}x{spec.image_size} images here: its last "
                        f"{side}x{side}x{spec.widths[-1]} feature map makes {head_inputs(spec):,} inputs "
                        f"to its linear layer (at most {MAX_FLATTEN:,}); use --head gap or a smaller --image-size")


def head_inputs(spec: ModelSpec) -> int:
    """Inputs of the final linear layer: the last stage's channels, times the last map's area for a flatten head."""
    return spec.widths[-1] * (output_size(spec) ** 2 if spec.head == "flatten" else 1)


def output_size(spec: ModelSpec) -> int:
    """Side length of the last feature map (3x3 convs/pools with padding 1 give ceil(n/stride))."""
    size = spec.image_size - spec.stem_kernel + 1 if spec.stem == "whiten" else spec.image_size  # (no padding)
    if spec.stem_pool != "none":
        size = (size + 1) // 2
    for s in spec.strides:  # a convpool stage's 2x2 max-pool floors
        size = size // s if spec.stage == "convpool" else (size + s - 1) // s
    return size


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of each `group` consecutive images (ghost batch
    norm, Hoffer et al. 2017). A batch cut into micro-batches that are multiples of the group, or spread
    over processes, is then normalised exactly as in one forward: the micro-batch becomes a choice of
    speed, not of result. The running averages are updated group after group, in order, so one process
    keeps the same ones whatever its micro-batch. Evaluation is plain BatchNorm, and the state_dict is
    BatchNorm2d's: checkpoints and model.pt load with or without it."""

    def __init__(self, num_features: int, group: int, eps: float, momentum: float):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or len(x) == self.group:
            return super().forward(x)
        if len(x) % self.group:
            raise ValueError(f"a training batch of {len(x)} images is not a multiple of the BatchNorm group "
                             f"{self.group}")
        return torch.cat([super(GhostBatchNorm2d, self).forward(part) for part in x.split(self.group)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


def norm(cout: int, spec: ModelSpec) -> nn.BatchNorm2d:
    bn = (GhostBatchNorm2d(cout, spec.bn_group, spec.bn_eps, spec.bn_momentum) if spec.bn_group
          else nn.BatchNorm2d(cout, eps=spec.bn_eps, momentum=spec.bn_momentum))
    bn.weight.requires_grad_(spec.bn_weight)
    return bn


class SubsampledConv1x1(nn.Conv2d):
    """A strided 1x1 conv computed as its stride's subsampling, then the conv at stride 1: the same values
    (bit for bit) and the same state_dict. Why: torch 2.14's CPU backward of a strided 1x1 conv on a
    channels-last batch of an odd size corrupts memory with more than one thread (a segfault, seen at
    batch 25 and 125 with 8 input channels on an AVX512 EPYC), and micro-batches of odd sizes are common."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return nn.functional.conv2d(x[:, :, ::s[0], ::s[1]], self.weight, self.bias)


def conv_bn(cin: int, cout: int, kernel: int, stride: int, spec: ModelSpec) -> nn.Sequential:
    conv = SubsampledConv1x1 if kernel == 1 and stride > 1 else nn.Conv2d
    return nn.Sequential(conv(cin, cout, kernel, stride, kernel // 2, bias=spec.conv_bias), norm(cout, spec))


def activation(spec: ModelSpec) -> nn.Module:
    return nn.GELU() if spec.act == "gelu" else nn.ReLU(inplace=True)


class Block(nn.Module):
    """Basic residual block: conv-BN-act-conv-BN + shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, spec: ModelSpec):
        super().__init__()
        s1, s2 = (stride, 1) if spec.stride_conv == "first" else (1, stride)
        self.conv1 = conv_bn(cin, cout, 3, s1, spec)
        self.conv2 = conv_bn(cout, cout, 3, s2, spec)
        self.shortcut = conv_bn(cin, cout, 1, stride, spec) if stride != 1 or cin != cout else nn.Identity()
        self.act = activation(spec)
        self.act_after_add = spec.relu_after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.act(self.conv1(x))) + self.shortcut(x)
        return self.act(out) if self.act_after_add else out


class PlainBlock(nn.Sequential):
    """conv-BN-act, no shortcut (airbench's second conv of a group)."""

    def __init__(self, cin: int, cout: int, stride: int, spec: ModelSpec):
        super().__init__(*conv_bn(cin, cout, 3, stride, spec), activation(spec))


class ConvPool(nn.Sequential):
    """conv -> 2x2 max-pool (stride 2 only) -> BN -> act: a stage's entry in ResNet-9 and airbench."""

    def __init__(self, cin: int, cout: int, stride: int, spec: ModelSpec):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=spec.conv_bias),
                         nn.MaxPool2d(2) if stride == 2 else nn.Identity(), norm(cout, spec), activation(spec))


class ResNet(nn.Module):
    stem: nn.Sequential
    blocks: nn.Sequential
    head: nn.Sequential

    def __init__(self, spec: ModelSpec):
        super().__init__()
        check_spec(spec)
        self.spec = spec
        pool = {"none": nn.Identity(), "avg": nn.AvgPool2d(3, 2, 1), "max": nn.MaxPool2d(3, 2, 1)}
        if spec.stem == "whiten":
            whiten = nn.Conv2d(3, spec.stem_width, spec.stem_kernel, bias=True)
            whiten.weight.requires_grad_(False)  # set from the data by init_whitening, then fixed
            nn.init.zeros_(whiten.bias)  # type: ignore[arg-type]  # bias=True: a tensor
            self.stem = nn.Sequential(whiten, activation(spec), pool[spec.stem_pool])
        else:
            self.stem = nn.Sequential(conv_bn(3, spec.stem_width, spec.stem_kernel, 1, spec), activation(spec),
                                      pool[spec.stem_pool])
        blocks: list[nn.Module] = []
        cin = spec.stem_width
        block = Block if spec.block == "basic" else PlainBlock
        for width, n, stride in zip(spec.widths, spec.blocks, spec.strides):
            if spec.stage == "convpool":
                blocks.append(ConvPool(cin, width, stride, spec))
                stride, cin = 1, width
            for i in range(n):
                blocks.append(block(cin, width, stride if i == 0 else 1, spec))
                cin = width
        # A flat list so feature-map hooks can name every block: blocks.0, blocks.1, ...
        self.blocks = nn.Sequential(*blocks)
        linear = nn.Linear(head_inputs(spec), spec.num_classes, bias=spec.head_bias)
        poolings: dict[str, list[nn.Module]] = {"gap": [nn.AdaptiveAvgPool2d(1)], "max": [nn.AdaptiveMaxPool2d(1)],
                                                "flatten": []}
        pooling = poolings[spec.head]
        self.head = nn.Sequential(*pooling, nn.Flatten(), linear)
        self.logit_scale = spec.logit_scale
        if spec.dirac_init:
            for m in self.blocks.modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    nn.init.dirac_(m.weight.data[:m.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.blocks(self.stem(x)))
        return logits * self.logit_scale if self.logit_scale != 1 else logits

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set a whitening stem from normalised training images: the filters are the eigenvectors of
        the k x k patch covariance scaled by 1/sqrt(eigenvalue), and their negatives (so the
        activation after it keeps both signs). Known from airbench (Jordan 2024)."""
        conv = self.stem[0]
        assert isinstance(conv, nn.Conv2d)
        k = conv.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3 * k * k)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).flip(0)  # largest first
        filters = filters.view(-1, 3, k, k).float()  # each patch was flattened in (c, h, w) order
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))


def build_model(spec: ModelSpec) -> ResNet:
    return ResNet(spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def forward_outputs(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One eval-mode forward pass of `x`; (name, output) of each given module, in call order (a module
    called twice appears twice). The one forward-hook harness: the model summary and the feature maps."""
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=name: outputs.append((n, o.detach())))
             for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.forward(x)  # not __call__: a compiled module (--compile) skips hooks added after it compiled
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return outputs


def summarize(model: nn.Module, side: int) -> str:
    """Per layer: output shape and parameters; then the totals (a torchinfo-style table)."""
    shown = {name: m for name, m in model.named_modules()
             if name and (not list(m.children()) or isinstance(m, Block)) and not isinstance(m, nn.Identity)}
    x = torch.zeros(1, 3, side, side, device=next(model.parameters()).device)
    rows = [dict(layer=name, type="Block (sum)" if isinstance(shown[name], Block) else type(shown[name]).__name__,
                 output_shape=str(tuple(out.shape[1:])),
                 params=f"{sum(p.numel() for p in shown[name].parameters()):,}")  # a Block sums its layers
            for name, out in forward_outputs(model, shown, x)]
    return "\n".join([text_table(rows, ["layer", "type", "output_shape", "params"], right={"params"}),
                      f"total parameters: {count_params(model):,}",
                      f"size: {model_bytes(model) / 2**20:.2f} MB (parameters and buffers)"])
