"""The accelerator and how a run is distributed: one process, DDP (GPUs, or CPU processes over gloo) or
DeepSpeed ZeRO (which backend: `cifar_dist.backends`), and the checks that the world fits the config.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object

from cifar_dist.config import Config, ConfigError


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of `names` that are not installed."""
    return [m for m in names if importlib.util.find_spec(m) is None]


def make_accelerator(cfg: Config, trackers: list[str], plugin: Any = None) -> Accelerator:
    """The run's Accelerator: `accelerate launch`'s settings (or `plugin`), checked against the config."""
    deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and (missing := missing_modules(("deepspeed", "transformers"))):
        raise ConfigError(f"DeepSpeed was asked for but {' and '.join(missing)} is not installed: "
                          "pip install -e '.[deepspeed]'")
    cuda = torch.cuda.is_available()
    # Without a GPU, Accelerate only sees a multi-process world (torchrun, Ray Train) when told it runs on
    # CPU; but not under DeepSpeed, which that would silently turn into plain DDP. DeepSpeed on CPU needs
    # gloo named, or it asks for a GPU backend and sees a world of one.
    cpu_world = not cuda and not deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1
    process_group = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision or None, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=trackers or None, project_dir=cfg.output_dir or "runs", cpu=cpu_world,
                              kwargs_handlers=process_group, deepspeed_plugin=plugin)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 on CPU")
    if cfg.batch_size % (accelerator.num_processes * cfg.grad_accum):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                          f"({accelerator.num_processes} x {cfg.grad_accum})")
    return accelerator


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator: Accelerator, cfg: Config) -> None:
    """What DeepSpeed needs that a plain loop does not: its batch sizes, from our global batch size (we
    prepare no DataLoader for Accelerate to read them from)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    accum = ds.get("gradient_accumulation_steps", "auto")
    if accum not in ("auto", cfg.grad_accum):
        raise ConfigError(f"the DeepSpeed config has gradient_accumulation_steps {accum} but --grad-accum is "
                          f"{cfg.grad_accum}; make them equal")
    ds.update(train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
              train_micro_batch_size_per_gpu=cfg.batch_size // (accelerator.num_processes * cfg.grad_accum))
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        # DeepSpeed's own bf16 mode breaks convs and BatchNorm on CPU; its torch autocast mode works.
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def rank_digests(model: torch.nn.Module) -> list[str]:
    """Every rank's weight digest (collective): equal digests show the ranks hold the same model."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return gather_object([h.hexdigest()[:16]])
