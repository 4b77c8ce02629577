"""The accelerator and how a run is distributed: one process, DDP (GPUs, or CPU processes over gloo) or
DeepSpeed ZeRO (which backend: `cifar_dist.backends`), and the checks that the world fits the config.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DistributedType, InitProcessGroupKwargs, broadcast_object_list, gather_object,
                               parse_flag_from_env)

from cifar_dist import machine
from cifar_dist.config import Config, ConfigError


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of `names` that are not installed."""
    return [m for m in names if importlib.util.find_spec(m) is None]


def make_accelerator(cfg: Config, trackers: list[str], plugin: Any = None) -> tuple[Accelerator, dict[str, Any]]:
    """The run's Accelerator: `accelerate launch`'s settings (or `plugin`), checked against the config,
    with this machine's CPU threads and precision (`cifar_dist.machine`); and those choices, for the record."""
    deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and (missing := missing_modules(("deepspeed", "transformers"))):
        raise ConfigError(f"DeepSpeed was asked for but {' and '.join(missing)} is not installed: "
                          "pip install -e '.[deepspeed]'")
    if plugin is not None:  # as Accelerator would, before the process group below: DeepSpeed starts it
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    cuda = torch.cuda.is_available()
    # Without a GPU, Accelerate only sees a multi-process world (torchrun, Ray Train) when told it runs on
    # CPU; but not under DeepSpeed, which that would silently turn into plain DDP. DeepSpeed on CPU needs
    # gloo named, or it asks for a GPU backend and sees a world of one.
    cpu_world = not cuda and not deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = cpu_world or parse_flag_from_env("ACCELERATE_USE_CPU")  # as AcceleratorState reads it (--cpu)
    backend = dict(backend="gloo") if deepspeed and not cuda else {}
    state = PartialState(cpu=cpu, **backend)  # the process group first: the ranks agree on the precision
    choices = machine_choices(cfg, state)
    accelerator = Accelerator(mixed_precision=choices["mixed_precision"], gradient_accumulation_steps=cfg.grad_accum,
                              log_with=trackers or None, project_dir=cfg.output_dir or "runs", cpu=cpu,
                              kwargs_handlers=[InitProcessGroupKwargs(**backend)] if backend else [],
                              deepspeed_plugin=plugin)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 on CPU")
    if cfg.batch_size % (accelerator.num_processes * cfg.grad_accum):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                          f"({accelerator.num_processes} x {cfg.grad_accum})")
    return accelerator, choices


def machine_choices(cfg: Config, state: PartialState) -> dict[str, Any]:
    """On a CPU, the threads of this process (set here); the precision to train in and, where a probe
    measured it, the probe (the main process's, broadcast: every rank trains in the same precision)."""
    choices: dict[str, Any] = dict(cpu_threads=None, precision_probe=None)
    if state.device.type == "cpu":
        threads, why = machine.cpu_threads(cfg)
        torch.set_num_threads(threads)
        choices.update(cpu_threads=threads, cpu_threads_from=why)
    asked = cfg.mixed_precision if cfg.mixed_precision != "auto" else machine.launch_precision() or "auto"
    if state.device.type == "cpu" and asked in ("auto", "bf16"):
        probe = [machine.probe(cfg, state.num_processes) if state.is_main_process else None]
        choices["precision_probe"] = broadcast_object_list(probe)[0]
    speedup = choices["precision_probe"]["speedup"] if choices["precision_probe"] else None
    gpu_bf16 = state.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    choices["mixed_precision"], warning = machine.choose_precision(asked, state.device.type, gpu_bf16, speedup)
    choices["mixed_precision_asked"] = asked
    if warning and state.is_main_process:
        print(warning, file=sys.stderr, flush=True)
    return choices


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
