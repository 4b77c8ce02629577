"""The one config object: every setting of a run, its defaults, the presets and the recipes.

A run's config is resolved in layers, each overriding the one before:
dataclass defaults -> preset (architecture) -> recipe (training) -> `--config FILE.yaml` -> CLI flags.
The resolved config is saved as `<output-dir>/config.yaml` and loads back with `--config`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_dist import tracking
from cifar_dist.model import ModelSpec, SpecError, check_spec


class ConfigError(ValueError):
    """Bad input; the message is one line that names the problem."""


def opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


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
    # airbench94's training (Jordan 2024): batch 1024, Nesterov SGD momentum 0.85, lr 1.5 per mean loss
    # (11.5 per 1024 summed), the same weight decay per step on every parameter, BatchNorm lr x64,
    # triangular schedule 0.2 -> 1 (23 %) -> 0.07, label smoothing 0.2, 2-pixel reflect translations,
    # alternating flips, lookahead EMA, whitening bias trained 3 epochs, 6-view TTA.
    "fast": dict(optimizer="sgd", batch_size=1024, epochs=10, lr=1.5, momentum=0.85, nesterov=True,
                 weight_decay=0.0153 / (1 + 1 / 0.15) / 1.5, decay_all=True, norm_lr_scale=64.0,
                 label_smoothing=0.2, schedule="onecycle", warmup=0.23, lr_start=0.2, lr_end=0.07,
                 crop_padding=2, crop_mode="reflect", flip="alternate", tta="flip-translate", lookahead=True,
                 whiten_bias_epochs=3, normalize="dataset"),
    # airbench96's training: as `fast` with lr 9.0 and weight decay 0.012 per 1024 (so the same decay per
    # unit of lr), 31 epochs, warm-up 10 % from 0.2 then linear decay to 0, 4-pixel reflect translations,
    # 12-pixel cutout. Its 96.0 % was measured over 400 runs on an A100; ours needs a GPU (see README).
    "best": dict(optimizer="sgd", batch_size=1024, epochs=31, lr=9.0 / (1 + 1 / 0.15), momentum=0.85,
                 nesterov=True, weight_decay=0.012 / 9.0, decay_all=True, norm_lr_scale=64.0, label_smoothing=0.2,
                 schedule="onecycle", warmup=0.1, lr_start=0.2, lr_end=0.0, crop_padding=4, crop_mode="reflect",
                 flip="alternate", cutout=12, tta="flip-translate", lookahead=True, whiten_bias_epochs=3,
                 normalize="dataset"),
}
# The recipe a preset trains with unless --recipe says otherwise.
PRESET_RECIPE = {"fast": "fast", "best": "best"}


@dataclass
class Config:
    preset: str = opt("seed3", f"architecture preset: {', '.join(PRESETS)}")
    recipe: str = opt("default", f"training recipe: {', '.join(RECIPES)}")
    model: ModelSpec = field(default_factory=ModelSpec)
    # data
    dataset: str = opt("cifar10", "cifar10 (from --data-dir) or synthetic (generated, for smoke runs)")
    data_dir: str = opt("", "CIFAR-10 folder (binary or python layout); default $CIFAR10_DIR, then ./data")
    download: bool = opt(False, "download CIFAR-10 into --data-dir with torchvision if missing")
    train_subset: int = opt(0, "use only the first N training images (0: all)")
    test_subset: int = opt(0, "use only the first N test images (0: all)")
    val_size: int = opt(0, "hold out N training images (fixed by --seed) as a validation set")
    eval_test: bool = opt(True, "evaluate on the test set every epoch (Tune trials rank on validation only)")
    crop_padding: int = opt(4, "random-crop augmentation: pad by N pixels then crop (0: off)")
    crop_mode: str = opt("zeros", "padding for the random crop: zeros or reflect")
    cutout: int = opt(0, "cutout augmentation: blank one N x N square of each training image (0: off)")
    flip: str = opt("random", "horizontal flips: none, random, alternate (flip each image every other epoch)")
    normalize: str = opt("dataset", "normalisation: dataset (its own mean/std) or imagenet")
    # optimisation
    epochs: int = opt(20, "training epochs")
    batch_size: int = opt(256, "GLOBAL batch size, split over processes and accumulation steps")
    grad_accum: int = opt(1, "gradient accumulation steps")
    optimizer: str = opt("sgd", "sgd (with --momentum/--nesterov) or adam (decoupled weight decay)")
    lr: float = opt(0.2, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum for SGD")
    weight_decay: float = opt(1e-3, "weight decay (not applied to BatchNorm and biases unless --decay-all)")
    decay_all: bool = opt(False, "weight decay on BatchNorm and biases too, at the same rate per step")
    norm_lr_scale: float = opt(1.0, "lr multiplier of the BatchNorm parameters")
    head_lr_scale: float = opt(0.0, "lr multiplier of the final linear layer; 0: auto, min(1, 512 / its inputs) "
                                    "for SGD (a flatten head's step grows with its fan-in), 1 for Adam")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy loss")
    schedule: str = opt("onecycle", "lr schedule: constant, onecycle (linear warm-up, linear decay), cosine")
    warmup: float = opt(0.15, "fraction of training spent warming up the learning rate")
    lr_start: float = opt(0.0, "onecycle: the lr at the start of warm-up, as a fraction of the peak")
    lr_end: float = opt(0.0, "onecycle: the lr at the end of training, as a fraction of the peak")
    lookahead: bool = opt(False, "every 5 steps pull the weights to their EMA (decay rising to 0.95^5 as "
                                 "training ends); the final weights are the EMA's (airbench)")
    whiten_bias_epochs: int = opt(3, "a whitening stem's bias trains for the first N epochs, then stays fixed")
    # speed
    mixed_precision: str = opt("", "no, bf16 or fp16 (GPU only); default: what accelerate launch says")
    channels_last: bool = opt(True, "channels-last memory layout (faster convolutions)")
    compile: bool = opt(False, "torch.compile the model")
    tta: str = opt("flip", "test-time augmentation at evaluation: none, flip (average with the mirror image), "
                           "flip-translate (also 1-pixel shifts)")
    eval_batch_size: int = opt(1000, "batch size for evaluation, per process")
    eval_every: int = opt(1, "evaluate every N epochs (and always after the last)")
    # tracking and pictures
    tracker: str = opt("none", "none, wandb, tensorboard or wandb,tensorboard (main process only)")
    run_name: str = opt("", "tracker run name; default: the output directory's name")
    group: str = opt("", "tracker group (a Tune search or a SLURM job groups its runs)")
    feature_maps_every: int = opt(0, "log and save feature maps every N epochs (0: only at the end)")
    feature_channels: int = opt(8, "channels per layer shown in the feature-map grids")
    # run
    seed: int = opt(0, "random seed (weights, data order, augmentation)")
    output_dir: str = opt("", "where results and checkpoints go; default runs/<preset>-<timestamp>")
    keep_checkpoints: int = opt(2, "keep the last K epoch checkpoints")
    log_every: int = opt(50, "update the progress bar every N steps (each update syncs the device)")


CHOICES = dict(dataset=("cifar10", "synthetic"), tta=("none", "flip", "flip-translate"),
               flip=("none", "random", "alternate"), crop_mode=("zeros", "reflect"),
               normalize=("dataset", "imagenet"), optimizer=("sgd", "adam"),
               schedule=("constant", "onecycle", "cosine"), mixed_precision=("", "no", "bf16", "fp16"),
               preset=tuple(PRESETS), recipe=tuple(RECIPES))


def check_config(cfg: Config) -> None:
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"unknown {name} {getattr(cfg, name)!r}; choose from "
                              f"{', '.join(a for a in allowed if a)}")
    for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "log_every",
                 "feature_channels", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise ConfigError(f"lr must be a positive number, got {cfg.lr}")
    for name in ("weight_decay", "momentum", "warmup", "label_smoothing", "lr_start", "lr_end"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (name != "weight_decay" and value >= 1):
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if not math.isfinite(cfg.head_lr_scale) or cfg.head_lr_scale < 0:
        raise ConfigError(f"head_lr_scale must be >= 0, got {cfg.head_lr_scale}")
    if not math.isfinite(cfg.norm_lr_scale) or cfg.norm_lr_scale <= 0:
        raise ConfigError(f"norm_lr_scale must be positive, got {cfg.norm_lr_scale}")
    try:
        tracking.parse(cfg.tracker)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("train_subset", "test_subset", "val_size", "crop_padding", "cutout", "feature_maps_every",
                 "whiten_bias_epochs"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.cutout > 32:
        raise ConfigError(f"cutout must be at most the image size 32, got {cfg.cutout}")
    try:
        check_spec(cfg.model)
    except SpecError as e:
        raise ConfigError(str(e)) from None


# --- YAML and CLI ---------------------------------------------------------------------------

def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings")
    return data


def _fields(cls: type) -> dict[str, tuple[Any, dict]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)}


MODEL_FIELDS = _fields(ModelSpec)
TOP_FIELDS = {k: v for k, v in _fields(Config).items() if k != "model"}


def _apply(cfg: Config, overrides: dict[str, Any], source: str) -> None:
    """Set fields from a flat or {model: {...}} mapping, type-checked."""
    flat = dict(overrides)
    flat.update(flat.pop("model", None) or {})
    for key, value in flat.items():
        key = key.replace("-", "_")
        if key in TOP_FIELDS:
            target, typ = cfg, TOP_FIELDS[key][0]
        elif key in MODEL_FIELDS:
            target, typ = cfg.model, MODEL_FIELDS[key][0]
        else:
            raise ConfigError(f"unknown setting {key!r} in {source}")
        setattr(target, key, _coerce(value, typ, key, source))


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    try:
        if typ is bool:
            if isinstance(value, str):
                return {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            if not isinstance(value, bool):
                raise ValueError
            return value
        if typing.get_origin(typ) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [int(x) for x in items if str(x).strip() != ""]
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (ValueError, TypeError, KeyError):
        raise ConfigError(f"{key} in {source} must be {getattr(typ, '__name__', typ)}, got {value!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2 (argparse adds usage)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(prog: str = "cifar_dist.train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Train a ResNet on CIFAR-10 (see README).",
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML config file (e.g. a run's config.yaml); flags override it")
    for name, (typ, meta) in {**TOP_FIELDS, **MODEL_FIELDS}.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        if typ is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                           help=meta.get("help") or MODEL_HELP.get(name))
        else:
            p.add_argument(*flags, dest=name, type=str, help=meta.get("help") or MODEL_HELP.get(name),
                           metavar="N,N,..." if typing.get_origin(typ) is list else typ.__name__.upper())
    return p


MODEL_HELP = dict(
    stem_width="channels of the stem conv", stem_kernel="kernel size of the stem conv",
    stem_pool="pooling after the stem: none, avg or max (3x3, stride 2)",
    widths="channels of each stage, e.g. 64,128,256", blocks="residual blocks per stage, e.g. 2,2,2",
    strides="stride of each stage (1 or 2), e.g. 1,2,2", head="gap (global average pool) or flatten",
    stride_conv="which conv of a block carries its stride: first or second",
    relu_after_add="activation after each residual add", conv_bias="bias in convolutions",
    num_classes="number of classes",
    stem="conv, or whiten: a frozen patch-whitening conv set from the data (stem_width = 2*3*k*k)",
    stage="resnet (strided blocks) or convpool (conv, 2x2 max-pool, BN, act, then 0..n blocks)",
    block="basic (residual, two convs) or plain (conv-BN-act, no shortcut)", act="relu or gelu",
    bn_momentum="BatchNorm running-stat momentum (PyTorch convention)", bn_eps="BatchNorm epsilon",
    bn_weight="learnable BatchNorm scales (off: fixed at 1)", head_bias="bias in the final linear layer",
    logit_scale="multiply the logits by this", dirac_init="3x3 convs start as identity on their first channels")


def resolve(argv: list[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """CLI args (and/or a dict, e.g. from a Tune trial) -> a checked Config."""
    args = vars(build_parser().parse_args([] if argv is None else argv))
    file_values = load_yaml(args.pop("config")) if "config" in args else {}
    overrides = overrides or {}
    layers = [(file_values, "the config file"), (overrides, "overrides"), (args, "the command line")]
    preset, recipe = "seed3", None
    for values, _ in layers:
        preset, recipe = values.get("preset", preset), values.get("recipe", recipe)
    recipe = recipe or PRESET_RECIPE.get(preset, "default")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    cfg = Config(preset=preset, recipe=recipe)
    _apply(cfg, PRESETS[preset], f"preset {preset}")
    _apply(cfg, RECIPES[recipe], f"recipe {recipe}")
    for values, source in layers:
        _apply(cfg, values, source)
    check_config(cfg)
    return cfg


def flags_markdown() -> str:
    """The README's table of every train.py flag: `python -m cifar_dist.config`."""
    defaults = {k: v for k, v in to_dict(Config()).items() if k != "model"}
    rows = ["| flag | default | what it does |", "| --- | --- | --- |"]
    for a in build_parser()._actions:
        if not a.option_strings or a.dest == "help":
            continue
        flag = f"`{a.option_strings[0]}`" + (f" / `--no-{a.option_strings[0][2:]}`" if a.nargs == 0 else "")
        default = "" if a.dest == "config" else defaults.get(a.dest, "preset")
        shown = "" if a.dest == "config" else f"`{default if default != '' else '(empty)'}`"
        rows.append(f"| {flag} | {shown} | {a.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flags_markdown())
