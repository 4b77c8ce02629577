"""The named architectures (presets) and trainings (recipes): a new one is an entry here.

A preset is a set of `ModelSpec` values; a recipe is a set of overrides of the `Config` defaults (the
defaults themselves are the `default` recipe). `cifar_dist.config.resolve` applies the preset, then
its recipe (`PRESET_RECIPE`, unless --recipe says otherwise), then a config file, then the flags.
"""
from __future__ import annotations

from typing import Any

# Architectures. `seed2`/`seed3` are the tutorial's networks, exactly (conv bias included).
PRESETS: dict[str, dict[str, Any]] = {
    "seed2": dict(stem_width=16, stem_pool="none", widths=[16, 32], blocks=[1, 1], strides=[1, 1],
                  head="flatten", stride_conv="second", relu_after_add=False, conv_bias=True),
    "seed3": dict(stem_width=32, stem_pool="avg", widths=[32, 64, 128], blocks=[1, 1, 1],
                  strides=[1, 1, 2], head="flatten", stride_conv="second", relu_after_add=True,
                  conv_bias=True),
    "resnet18": dict(stem_width=64, stem_pool="none", widths=[64, 128, 256, 512], blocks=[2, 2, 2, 2],
                     strides=[1, 2, 2, 2], head="gap", stride_conv="first", relu_after_add=True,
                     conv_bias=False),
    # airbench94's network (Jordan 2024) in this family: a frozen 2x2 whitening stem, then three
    # conv -> max-pool -> BN -> GELU stages of widths 64/256/256 each followed by one plain conv,
    # BatchNorm shifts only, max-pooled head scaled by 1/9. 1,971,352 trainable parameters.
    "fast": dict(stem="whiten", stem_width=24, stem_kernel=2, stem_pool="none", stage="convpool", block="plain",
                 widths=[64, 256, 256], blocks=[1, 1, 1], strides=[2, 2, 2], head="max", head_bias=False,
                 logit_scale=1 / 9, act="gelu", bn_momentum=0.4, bn_eps=1e-12, bn_weight=False, dirac_init=True,
                 conv_bias=False),
    # airbench96's network (Jordan 2024, its 06/2024 version) in this family: the same stem and head, stages
    # of widths 128/512/512, each conv -> max-pool -> BN -> GELU then one residual block (conv-BN-GELU-
    # conv-BN, + identity, GELU); PyTorch's BatchNorm momentum. 10 convs, 12,717,464 trainable parameters.
    "best": dict(stem="whiten", stem_width=24, stem_kernel=2, stem_pool="none", stage="convpool", block="basic",
                 widths=[128, 512, 512], blocks=[1, 1, 1], strides=[2, 2, 2], head="max", head_bias=False,
                 logit_scale=1 / 9, act="gelu", relu_after_add=True, bn_momentum=0.1, bn_eps=1e-12,
                 bn_weight=False, dirac_init=True, conv_bias=False),
}

# Training recipes, as overrides of the Config defaults (the defaults are the `default` recipe).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The tutorial's training, exactly: Adam 1e-3, batch 100, 20 epochs, no augmentation,
    # ImageNet mean/std, no weight decay, no label smoothing, constant learning rate.
    "tutorial": dict(optimizer="adam", lr=1e-3, batch_size=100, epochs=20, crop_padding=0, flip="none",
                     normalize="imagenet", weight_decay=0.0, label_smoothing=0.0, schedule="constant",
                     warmup=0.0, tta="none"),
    # The tutorial's networks trained right (`--preset seed3 --recipe seed`): they underfit (20 epochs of the
    # default recipe end at 90 % training accuracy, 88.8 % test on seed3), so this recipe takes more steps
    # (batch 128, lr scaled to 0.1), milder translations (2 px, reflected) and half the weight decay, and
    # gains what costs no training: alternating flips, the lookahead EMA and 6-view TTA. The conv filters
    # train with Muon (as `fast`'s do), the rest with this SGD: seed3 reached 91.49 % (3 seeds) against 89.46 %
    # with SGD on everything (2 seeds; docs/presets.md). A Muon step moves a filter bank of fixed norm by about its lr
    # whatever the gradient's scale, so the lr is per step: with 391 steps an epoch against airbench's 25,
    # 0.04 (fast: 0.24), and momentum 0.8 for a batch of 128 (fast: 0.6 at 2,000). The first values tried.
    "seed": dict(batch_size=128, lr=0.1, weight_decay=5e-4, crop_padding=2, crop_mode="reflect", flip="alternate",
                 lookahead=True, tta="flip-translate", optimizer="muon", muon_lr=0.04, muon_momentum=0.8),
    # airbench94's training (Jordan 2024), `fast`'s recipe until the Muon one below measured better: batch
    # 1024, Nesterov SGD momentum 0.85, lr 1.5 per mean loss (11.5 per 1024 summed), the same weight decay
    # per step on every parameter, BatchNorm lr x64,
    # triangular schedule 0.2 -> 1 (23 %) -> 0.07, label smoothing 0.2, 2-pixel reflect translations,
    # alternating flips, lookahead EMA, whitening bias trained 3 epochs, 6-view TTA.
    "fast-sgd": dict(optimizer="sgd", batch_size=1024, epochs=10, lr=1.5, momentum=0.85, nesterov=True,
                     weight_decay=0.0153 / (1 + 1 / 0.15) / 1.5, decay_all=True, norm_lr_scale=64.0,
                     label_smoothing=0.2, schedule="onecycle", warmup=0.23, lr_start=0.2, lr_end=0.07,
                     crop_padding=2, crop_mode="reflect", flip="alternate", tta="flip-translate", lookahead=True,
                     whiten_bias_epochs=3, normalize="dataset"),
    # `fast`'s own: airbench94_muon's training (Jordan 2024; 94.01 % in 2.59 s on an A100, n=200): batch 2000, 8 epochs,
    # Muon on the conv filters (lr 0.24, momentum 0.6), Nesterov SGD momentum 0.85 on the rest. Its SGD lrs
    # are per summed loss, 0.053 for biases (106 per mean loss) and 0.67 for the head; its head is unit-std
    # weights with logits x 1/256 where ours is PyTorch's init with logits x 1/9, so the same steps of the
    # same function need its head lr x (9/256)^2. Weight decay 0.004 per step on everything SGD trains;
    # lr decays linearly to 0 with no warm-up (the whitening bias's over its 3 epochs); no lookahead; the
    # `fast` augmentation and TTA.
    "fast": dict(optimizer="muon", batch_size=2000, epochs=8, lr=0.053 * 2000, momentum=0.85, nesterov=True,
                      muon_lr=0.24, muon_momentum=0.6, weight_decay=0.004 / (0.053 * 2000), decay_all=True,
                      norm_lr_scale=1.0, head_lr_scale=0.67 / 0.053 * (9 / 256) ** 2, label_smoothing=0.2,
                      schedule="onecycle", warmup=0.0, lr_end=0.0, crop_padding=2, crop_mode="reflect",
                      flip="alternate", tta="flip-translate", lookahead=False, whiten_bias_epochs=3,
                      whiten_bias_lr="linear", normalize="dataset"),
    # airbench96's training: as `fast-sgd` with lr 9.0 and weight decay 0.012 per 1024 (so the same decay per
    # unit of lr), 31 epochs, warm-up 10 % from 0.2 then linear decay to 0, 4-pixel reflect translations,
    # 12-pixel cutout. Its 96.0 % was measured over 400 runs on an A100; ours needs a GPU (see docs/results.md).
    "best": dict(optimizer="sgd", batch_size=1024, epochs=31, lr=9.0 / (1 + 1 / 0.15), momentum=0.85,
                 nesterov=True, weight_decay=0.012 / 9.0, decay_all=True, norm_lr_scale=64.0, label_smoothing=0.2,
                 schedule="onecycle", warmup=0.1, lr_start=0.2, lr_end=0.0, crop_padding=4, crop_mode="reflect",
                 flip="alternate", cutout=12, tta="flip-translate", lookahead=True, whiten_bias_epochs=3,
                 normalize="dataset"),
}
# The recipe a preset trains with unless --recipe says otherwise.
PRESET_RECIPE = {"fast": "fast", "best": "best"}

# What --preset auto chooses from, each a preset and flags (cifar_dist.auto); what each reached at a few
# epochs on real CIFAR-10 is cifar_dist/auto_table.json (`python -m bench.auto`). `best` is not among them
# until it has been measured (two hours an epoch count on a CPU).
AUTO: dict[str, list[str]] = {
    # `fast`'s shape at half its widths (0.197 GFLOP a training image, 28 % of `fast`'s), its Muon recipe
    # at batch 1000 (the SGD lr halved with the batch: airbench's lr is per summed loss; the same weight
    # decay per step, 0.004), flip TTA: for budgets of an epoch or two (81.5 % in one epoch, 49 s, on a
    # 2-core EPYC, where 2 epochs of `fast` at batch 2000 gave 84.9 % in 100 s).
    "quick": ["--preset", "fast", "--widths", "32,128,128", "--batch-size", "1000", "--lr", "53",
              "--weight-decay", "7.547e-5", "--tta", "flip"],
    "fast": ["--preset", "fast"],
}
