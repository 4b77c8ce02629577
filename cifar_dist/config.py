"""The one config object: every setting of a run, its default, its allowed values and its role.

A run's config is resolved in layers, each overriding the one before:
dataclass defaults -> preset (architecture) -> recipe (training) -> `--config FILE.yaml` -> CLI flags.
The resolved config is saved as `<output-dir>/config.yaml` and loads back with `--config`.
Each field is declared once (`settings.setting`): the flags, their help, the checks of allowed values
and what makes a run "the same run" are all derived from these declarations.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cifar_dist import tracking
from cifar_dist.model import ModelSpec, SpecError, check_spec
from cifar_dist.recipes import PRESET_RECIPE, PRESETS, RECIPES
from cifar_dist.settings import allowed, check_choices, declared, describe, setting, with_role


class ConfigError(ValueError):
    """Bad input; the message is one line that names the problem."""


@dataclass
class Config:
    preset: str = setting("seed3", "architecture preset; auto (with --time-budget): of quick and fast, the one "
                                   "expected most accurate in the budget on this machine", choices=(*PRESETS, "auto"))
    recipe: str = setting("default", "training recipe (default: the preset's own, else default)",
                          choices=tuple(RECIPES))
    model: ModelSpec = field(default_factory=ModelSpec, metadata={"help": "the architecture", "role": "identity"})
    # data
    dataset: Literal["cifar10", "cifar100", "folder", "synthetic"] = setting(
        "cifar10", "CIFAR-10 or CIFAR-100 (fine labels) from --data-dir, a folder of your own pictures (one folder "
                   "per class), or a generated set for smoke runs; the model gets the dataset's number of classes "
                   "unless --num-classes says otherwise", "identity")
    data_dir: str = setting("", "the dataset's folder (CIFAR: binary or python layout; default $CIFAR10_DIR, "
                                "CIFAR-100: $CIFAR100_DIR, then ./data; folder: given)", "machine")
    test_fraction: float = setting(0.2, "folder without a test/ (or val/) folder: the test pictures of each class, "
                                        "drawn by --seed", "identity")
    skip_bad_images: bool = setting(False, "folder: leave out a picture that cannot be read (counted in the start "
                                           "line) instead of stopping at it", "identity")
    download: bool = setting(False, "download the dataset into --data-dir with torchvision if missing", "machine")
    train_subset: int = setting(0, "use only the first N training images (0: all)", "identity")
    test_subset: int = setting(0, "use only the first N test images (0: all)")
    val_size: int = setting(0, "hold out N training images (fixed by --seed) as a validation set", "identity")
    eval_test: bool = setting(True, "evaluate on the test set every epoch (Tune trials rank on validation only)")
    crop_padding: int = setting(4, "random-crop augmentation: pad by N pixels then crop (0: off)")
    crop_mode: Literal["zeros", "reflect"] = setting("zeros", "padding for the random crop")
    cutout: int = setting(0, "cutout augmentation: blank one N x N square of each training image (0: off)")
    flip: Literal["none", "random", "alternate"] = setting(
        "random", "horizontal flips (alternate: each image flips every other epoch)")
    normalize: Literal["dataset", "imagenet"] = setting("dataset", "normalisation statistics: its own or ImageNet's")
    # optimisation
    epochs: int = setting(20, "training epochs")
    time_budget: str = setting("", "train to a deadline instead (90s, 10m, 1h30m; slurm: the SLURM job's time left "
                                   "less a margin, slurm-60s: less 60s): the steps that fit this machine, from a "
                                   "measurement of this config's step, then moved to the pace measured (plan.json; "
                                   "kept on resume); '': --epochs")
    batch_size: int = setting(256, "GLOBAL batch size, split over processes and accumulation steps", "identity")
    grad_accum: int = setting(1, "gradient accumulation steps", "identity")
    optimizer: Literal["sgd", "adam", "muon"] = setting(
        "sgd", "SGD (with --momentum/--nesterov), Adam (decoupled weight decay), or Muon on the conv filters "
               "(--muon-lr/--muon-momentum) with SGD on the rest", "identity")
    lr: float = setting(0.2, "peak learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(True, "Nesterov momentum for SGD")
    muon_lr: float = setting(0.24, "Muon: the lr of the conv filters (each kept at norm sqrt(output channels))")
    muon_momentum: float = setting(0.6, "Muon: the conv filters' Nesterov momentum")
    weight_decay: float = setting(1e-3, "weight decay (not applied to BatchNorm and biases unless --decay-all)")
    decay_all: bool = setting(False, "weight decay on BatchNorm and biases too, at the same rate per step")
    norm_lr_scale: float = setting(1.0, "lr multiplier of the BatchNorm parameters")
    head_lr_scale: float = setting(0.0, "lr multiplier of the final linear layer; 0: auto, min(1, 512 / its inputs) "
                                        "for SGD (a flatten head's step grows with its fan-in), 1 for Adam")
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy loss")
    schedule: Literal["constant", "onecycle", "cosine"] = setting(
        "onecycle", "lr schedule (onecycle: linear warm-up, linear decay)")
    warmup: float = setting(0.15, "fraction of training spent warming up the learning rate")
    lr_start: float = setting(0.0, "onecycle: the lr at the start of warm-up, as a fraction of the peak")
    lr_end: float = setting(0.0, "onecycle: the lr at the end of training, as a fraction of the peak")
    lookahead: bool = setting(False, "every 5 steps pull the weights to their EMA (decay rising to 0.95^5 as "
                                     "training ends); the final weights are the EMA's (airbench)", "identity")
    whiten_bias_epochs: int = setting(3, "a whitening stem's bias trains for the first N epochs, then stays fixed")
    whiten_bias_lr: Literal["schedule", "linear"] = setting(
        "schedule", "a whitening stem's bias lr in those epochs: the schedule's (airbench94), or from the peak "
                    "linearly down to 0 (airbench94_muon)")
    # speed
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = setting(
        "auto", "auto: what accelerate launch was told, else on a GPU bf16 (fp16 where it has no bf16), on a CPU "
                "bf16 where a probe of this model's step measures it >= 1.1x faster than fp32 (cached), else fp32")
    cpu_threads: int = setting(0, "threads per process on a CPU; 0: OMP_NUM_THREADS if you set it, else the "
                                  "cores this process may use / processes on this machine", "machine")
    micro_batch: str = setting(
        "auto", "images per forward pass of a process: auto (on a CPU with --bn-group, the fastest of a short probe "
                "of this model's step at multiples of the group, cached; else whole), whole (the process's batch / "
                "--grad-accum), or N (a multiple of --bn-group); with a BatchNorm group it changes the speed only",
        "machine")
    channels_last: bool = setting(True, "channels-last memory layout (faster convolutions)")
    compile: bool = setting(False, "torch.compile the model")
    tta: Literal["none", "flip", "flip-translate"] = setting(
        "flip", "test-time augmentation at evaluation: flip averages with the mirror image, flip-translate "
                "also with 1-pixel shifts")
    eval_batch_size: int = setting(1000, "batch size for evaluation, per process", "machine")
    eval_every: int = setting(1, "evaluate every N epochs (and always after the last)")
    # tracking and pictures
    tracker: str = setting("none", f"none, or any of {', '.join(tracking.TRACKERS)}, comma-separated (main process "
                                   "only)", "record")
    run_name: str = setting("", "tracker run name; default: the output directory's name", "record")
    group: str = setting("", "tracker group (a Tune search or a SLURM job groups its runs)", "record")
    feature_maps_every: int = setting(0, "log and save feature maps every N epochs (0: only at the end)", "record")
    feature_channels: int = setting(8, "channels per layer shown in the feature-map grids", "record")
    # distribution and reproducibility
    sync_bn: bool = setting(False, "with several processes, BatchNorm statistics of the global batch (synchronised "
                                   "BatchNorm), as one process has them: the result does not depend on the world size")
    deterministic: bool = setting(False, "deterministic kernels only (one line names an op that has none): the same "
                                         "seed on the same machine gives bit-identical weights, on GPUs too")
    # run
    seed: int = setting(0, "random seed (weights, data order, augmentation)", "identity")
    output_dir: str = setting("", "where results and checkpoints go; default runs/<preset>-<timestamp>", "record")
    keep_checkpoints: int = setting(2, "keep the last K epoch checkpoints", "record")
    stop_after: int = setting(0, "stop after epoch N, its checkpoint kept: the same command with a later N (or 0) goes "
                                 "on from there, with any new optimiser settings; 0: train to the end", "record")
    log_every: int = setting(50, "update the progress bar every N steps (each update syncs the device)", "record")
    progress_seconds: float = setting(5.0, "when the output is not a terminal (a job log): a progress line about "
                                            "every tenth of an epoch, at most one per N seconds", "record")


def folder_classes(data_dir: str) -> int:
    """The number of class folders of --dataset folder (what its model is built for by default)."""
    from cifar_dist import folders

    try:
        return len(folders.class_names(folders.layout(Path(data_dir).expanduser())[0]))
    except folders.FolderError as e:
        raise ConfigError(str(e)) from None


FOLDER_NEEDS_DIR = "--dataset folder needs --data-dir: the folder of your pictures, one folder per class"
MICRO_WORDS = ("auto", "whole")  # --micro-batch's words; else a number
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}  # what a model is built for by default

# What makes a run "the same run" (the run-directory guard refuses a change of these), and what may
# differ between two runs with the same result (a benchmark reuses a finished run across these).
IDENTITY = with_role(Config, "identity")
INCIDENTAL = with_role(Config, "machine", "record")


def check_config(cfg: Config) -> None:
    """Raise a one-line ConfigError for the first setting outside its allowed values or range."""
    check_choices(cfg, ConfigError)
    for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "log_every",
                 "feature_channels", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("lr", "muon_lr"):
        if not math.isfinite(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be a positive number, got {getattr(cfg, name)}")
    for name in ("weight_decay", "momentum", "muon_momentum", "warmup", "label_smoothing", "lr_start", "lr_end"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (name != "weight_decay" and value >= 1):
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if not math.isfinite(cfg.head_lr_scale) or cfg.head_lr_scale < 0:
        raise ConfigError(f"head_lr_scale must be >= 0, got {cfg.head_lr_scale}")
    if not math.isfinite(cfg.progress_seconds) or cfg.progress_seconds < 0:
        raise ConfigError(f"progress_seconds must be >= 0, got {cfg.progress_seconds}")
    if not math.isfinite(cfg.norm_lr_scale) or cfg.norm_lr_scale <= 0:
        raise ConfigError(f"norm_lr_scale must be positive, got {cfg.norm_lr_scale}")
    try:
        tracking.parse(cfg.tracker)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("cpu_threads", "train_subset", "test_subset", "val_size", "crop_padding", "cutout",
                 "feature_maps_every", "whiten_bias_epochs", "stop_after"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.micro_batch not in MICRO_WORDS and not (cfg.micro_batch.isdigit() and int(cfg.micro_batch) > 0):
        raise ConfigError(f"micro_batch must be auto, whole or a positive number, got {cfg.micro_batch!r}")
    if cfg.model.bn_group and cfg.batch_size % cfg.model.bn_group:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of bn_group {cfg.model.bn_group}")
    if cfg.model.bn_group and cfg.sync_bn:
        raise ConfigError("--sync-bn with --bn-group: each BatchNorm group lies within one process already, and "
                          "its statistics are the same on any world size; drop --sync-bn")
    if cfg.preset == "auto" and not cfg.time_budget:
        raise ConfigError("preset auto chooses a training for a time budget: give --time-budget (e.g. 10m)")
    if cfg.time_budget:
        from cifar_dist.budget import check_budget  # (it builds on this module)

        check_budget(cfg.time_budget)
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {cfg.test_fraction}")
    side = cfg.model.image_size
    if side != 32 and cfg.dataset in ("cifar10", "cifar100"):
        raise ConfigError(f"image_size {side} needs --dataset folder (or synthetic): CIFAR's pictures are 32x32")
    if cfg.cutout > side:
        raise ConfigError(f"cutout must be at most the image size {side}, got {cfg.cutout}")
    try:
        check_spec(cfg.model)
    except SpecError as e:
        raise ConfigError(str(e)) from None


# --- YAML and CLI ---------------------------------------------------------------------------

def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Config, path: Path) -> None:
    """Written whole or not at all: a run killed while saving its config.yaml is still resumable."""
    from cifar_dist.rundir import write_atomic  # (rundir reads configs: imported here, not at the top)

    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


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


MODEL_FIELDS = declared(ModelSpec)
TOP_FIELDS = {k: v for k, v in declared(Config).items() if k != "model"}


def _apply(cfg: Config, overrides: dict[str, Any], source: str) -> None:
    """Set fields from a flat or {model: {...}} mapping, type-checked."""
    flat = dict(overrides)
    flat.update(flat.pop("model", None) or {})
    target: Config | ModelSpec
    for key, value in flat.items():
        key = key.replace("-", "_")
        if key in TOP_FIELDS:
            target, (typ, meta) = cfg, TOP_FIELDS[key]
        elif key in MODEL_FIELDS:
            target, (typ, meta) = cfg.model, MODEL_FIELDS[key]
        else:
            raise ConfigError(f"unknown setting {key!r} in {source}")
        setattr(target, key, _coerce(value, typ, meta, key, source))


def _coerce(value: Any, typ: Any, meta: dict[str, Any], key: str, source: str) -> Any:
    if allowed(typ, meta):  # checked once the layers are merged (check_config): a later layer may mend it
        return value
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


class DefaultsShown(argparse.HelpFormatter):
    """--help with each flag's default, where it has one and its own words do not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.option_strings and action.default not in (None, "", False, argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2 (argparse adds usage)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(prog: str = "cifar_dist.train", defaults: bool = True) -> argparse.ArgumentParser:
    """The flags of every Config field; `defaults`: each help ends with the field's default (--help)."""
    p = OneLineParser(prog=prog, description="Train a ResNet on CIFAR-10 (see docs/training.md). The defaults "
                      "shown are the default recipe's: a --preset or --recipe sets its own first (docs/presets.md).",
                      argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML config file (e.g. a run's config.yaml); flags override it")
    values = to_dict(Config())
    values.update(values.pop("model"))
    for name, (typ, meta) in {**TOP_FIELDS, **MODEL_FIELDS}.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        text, value = describe(typ, meta), values[name]
        if defaults and value not in ("", None) and "default" not in meta["help"]:  # (its own words say it)
            text += f" (default: {','.join(map(str, value)) if isinstance(value, list) else value})".replace("%", "%%")
        if typ is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(*flags, dest=name, type=str, help=text, metavar=metavar(typ, meta))
    return p


def metavar(typ: Any, meta: dict[str, Any]) -> str:
    if allowed(typ, meta):
        return "NAME"
    return "N,N,..." if typing.get_origin(typ) is list else typ.__name__.upper()


def resolve(argv: list[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """CLI args (and/or a dict, e.g. from a Tune trial) -> a checked Config."""
    args = vars(build_parser().parse_args([] if argv is None else argv))
    file_values = load_yaml(args.pop("config")) if "config" in args else {}
    overrides = overrides or {}
    layers = [(file_values, "the config file"), (overrides, "overrides"), (args, "the command line")]
    cfg = Config()
    for values, source in layers:  # the preset first: its recipe is the default recipe
        _apply(cfg, {k: values[k] for k in ("preset", "recipe") if k in values}, source)
    if not any("recipe" in values for values, _ in layers):
        cfg.recipe = PRESET_RECIPE.get(cfg.preset, "default")
    check_choices(cfg, ConfigError, ("preset", "recipe"))
    preset, recipe = cfg.preset, cfg.recipe
    _apply(cfg, PRESETS.get(preset, {}), f"preset {preset}")  # auto: chosen later (cifar_dist.auto)
    _apply(cfg, RECIPES[recipe], f"recipe {recipe}")
    for values, source in layers:
        _apply(cfg, values, source)
    given = {k.replace("-", "_") for values, _ in layers for k in [*values, *(values.get("model") or {})]}
    if cfg.dataset == "folder" and not cfg.data_dir:
        raise ConfigError(FOLDER_NEEDS_DIR)
    if "num_classes" not in given:
        cfg.model.num_classes = DATASET_CLASSES.get(cfg.dataset) or folder_classes(cfg.data_dir)
    check_config(cfg)
    return cfg


def flags_markdown() -> str:
    """The table of every train.py flag in docs/flags.md: `python -m cifar_dist.config`."""
    defaults = {k: v for k, v in to_dict(Config()).items() if k != "model"}
    rows = ["| flag | default | what it does |", "| --- | --- | --- |"]
    for a in build_parser(defaults=False)._actions:  # the table has a column of its own for them
        if not a.option_strings or a.dest == "help":
            continue
        flag = f"`{a.option_strings[0]}`" + (f" / `--no-{a.option_strings[0][2:]}`" if a.nargs == 0 else "")
        default = "" if a.dest == "config" else defaults.get(a.dest, "preset")
        shown = "" if a.dest == "config" else f"`{default if default != '' else '(empty)'}`"
        rows.append(f"| {flag} | {shown} | {a.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flags_markdown())
