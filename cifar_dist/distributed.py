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
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    parse_flag_from_env,
)

from cifar_dist import machine
from cifar_dist.config import Config, ConfigError


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of `names` that are not installed."""
    return [m for m in names if importlib.util.find_spec(m) is None]


def make_accelerator(cfg: Config, trackers: list[str], plugin: Any = None) -> tuple[Accelerator, dict[str, Any]]:
    """The run's Accelerator: `accelerate launch`'s settings (or `plugin`), checked against the config,
    with this machine's CPU threads, precision and micro-batch (`cifar_dist.machine`); and those choices,
    for the record. The micro-batch is Accelerate's gradient accumulation: --grad-accum's steps, each cut
    into forward passes of the micro-batch."""
    machine.use_deterministic_kernels(cfg.deterministic)  # before anything touches a GPU
    deepspeed = deepspeed_asked(plugin)
    if deepspeed and (missing := missing_modules(("deepspeed", "transformers"))):
        raise ConfigError(f"DeepSpeed was asked for but {' and '.join(missing)} is not installed: "
                          "pip install -e '.[deepspeed]'")
    if deepspeed:  # before DeepSpeed starts (its comm op, the process group): a refusal in a second
        check_accumulation(plugin.gradient_accumulation_steps if plugin is not None
                           else os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"), cfg)
    if plugin is not None:  # as Accelerator would, before the process group below: DeepSpeed starts it
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state, cpu, backend = process_group(deepspeed)  # the process group first: the ranks agree on the precision
    if cfg.batch_size % (state.num_processes * cfg.grad_accum):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                          f"({state.num_processes} x {cfg.grad_accum})")
    choices = machine_choices(cfg, state)
    choices.update(micro_batch(cfg, state, choices["mixed_precision"], deepspeed))
    accum = cfg.grad_accum * machine.whole_micro_batch(cfg, state.num_processes) // choices["micro_batch"]
    accelerator = Accelerator(mixed_precision=choices["mixed_precision"], gradient_accumulation_steps=accum,
                              log_with=trackers or None, project_dir=cfg.output_dir or "runs", cpu=cpu,
                              kwargs_handlers=[InitProcessGroupKwargs(**backend)] if backend else [],
                              deepspeed_plugin=plugin)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 on CPU")
    return accelerator, choices


def deepspeed_asked(plugin: Any) -> bool:
    """DeepSpeed was asked for: a plugin given (a Ray Train worker), or `accelerate launch`'s DeepSpeed config."""
    return plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group(deepspeed: bool) -> tuple[PartialState, bool, dict[str, str]]:
    """This process's place in the launch (Accelerate's PartialState, made once), whether Accelerate runs
    on the CPU, and the backend it must be told."""
    cuda = torch.cuda.is_available()
    # Without a GPU, Accelerate only sees a multi-process world (torchrun, Ray Train) when told it runs on
    # CPU; but not under DeepSpeed, which that would silently turn into plain DDP. DeepSpeed on CPU needs
    # gloo named, or it asks for a GPU backend and sees a world of one.
    cpu_world = not cuda and not deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = cpu_world or parse_flag_from_env("ACCELERATE_USE_CPU")  # as AcceleratorState reads it (--cpu)
    backend = dict(backend="gloo") if deepspeed and not cuda else {}
    if deepspeed and not cuda:
        skip_inference_comm_op()
    return PartialState(cpu=cpu, **backend), cpu, backend


def skip_inference_comm_op() -> None:
    """DeepSpeed on a CPU compiles its shared-memory all-reduce (the shm_comm op) with g++ when its comm
    starts, at a machine's first run (20 s on an idle 2-core machine, minutes on a busy one), for an op
    only inference's tensor parallelism calls (`inference_all_reduce`); ZeRO's collectives are
    torch.distributed's (gloo) either way. Marked incompatible, DeepSpeed does not build it, as on a
    platform without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


def micro_batch(cfg: Config, state: PartialState, precision: str, deepspeed: bool) -> dict[str, Any]:
    """The images of one forward pass in this process, why, and the probe that chose it (--micro-batch
    auto on a CPU with a BatchNorm group: the main process's, broadcast). Without a group, BatchNorm
    normalises over the micro-batch, so only the whole keeps the run's result."""
    whole, group = machine.whole_micro_batch(cfg, state.num_processes), cfg.model.bn_group
    if group and whole % group:
        raise ConfigError(f"a process's share of a step ({whole} images: batch_size / processes / grad_accum) "
                          f"must be a multiple of bn_group {group}")
    chosen: dict[str, Any] = dict(micro_batch=whole, micro_batch_from="whole", micro_batch_probe=None)
    if cfg.micro_batch == "auto":
        # A GPU runs its whole batch fastest (until a measurement says otherwise); under DeepSpeed the
        # probe's plain step is not what its engine runs
        reason = ("no --bn-group" if not group else "on a GPU" if state.device.type != "cpu"
                  else "under DeepSpeed" if deepspeed else "")
        if reason:
            return dict(chosen, micro_batch_from=f"auto: whole, {reason}")
        probe = [machine.micro_probe(cfg, state.num_processes, precision) if state.is_main_process else None]
        chosen["micro_batch_probe"] = broadcast_object_list(probe)[0]
        return dict(chosen, micro_batch=chosen["micro_batch_probe"]["best"], micro_batch_from="auto: fastest")
    if cfg.micro_batch == "whole":
        return chosen
    n = int(cfg.micro_batch)
    if not group and n != whole:
        raise ConfigError(f"--micro-batch {n} would change what BatchNorm normalises (the whole {whole} images of a "
                          f"forward pass); give --bn-group (a divisor of {n}), or --grad-accum to change the result")
    if n % max(group, 1) or whole % n:
        raise ConfigError(f"--micro-batch {n} must be a multiple of bn_group {group} that divides a process's "
                          f"share of a step ({whole} images)")
    return dict(chosen, micro_batch=n, micro_batch_from="--micro-batch")


# --- BatchNorm over the world ---------------------------------------------------------------------

class WorldSum(torch.autograd.Function):
    """A sum over every process whose gradient is the sum of every process's gradient: each rank's
    statistics feed every rank's loss."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return WorldSum.apply(x)


class GlobalBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's, over every process, as one process
    computes them: what torch.nn.SyncBatchNorm does on GPUs, on any device (CPU processes over gloo).
    Two all-reduces per layer and step: the sum (with the count), then the squared deviations from the
    global mean (the variance without a sum of squares' cancellation). Their backward sums every rank's
    gradient, so DDP's average of the ranks' gradients is the global batch's, as with one process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.distributed.is_initialized():
            return super().forward(x)
        xf, dims = x.float(), (0, 2, 3)
        stats = all_reduce(torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // x.shape[1]])]))
        count, mean = stats[-1], stats[:-1] / stats[-1]
        centred = xf - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            assert self.num_batches_tracked is not None and self.running_mean is not None
            assert self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * count / (count - 1), m)  # unbiased, as BatchNorm keeps it
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """--sync-bn: every BatchNorm2d over the global batch (torch's SyncBatchNorm on GPUs, where it has
    fused kernels; GlobalBatchNorm elsewhere). The state_dict keys are unchanged: checkpoints and model.pt
    load into a model with or without it."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            for new, old in zip(bn.parameters(), child.parameters()):
                new.requires_grad_(old.requires_grad)  # a fixed scale stays fixed (--no-bn-weight)
            setattr(model, name, bn)
        else:
            sync_batchnorm(child, device)
    return model


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP's wrapper (or DeepSpeed's engine). Accelerate's unwrap_model imports deepspeed
    whenever it is installed, to look for its engine: a CPU-second of every process's start-up, and
    DeepSpeed's "Setting accelerator to CPU" line in runs that do not use it. So it is asked under DeepSpeed
    only. (A compiled model needs nothing: train.py compiles in place.)"""
    if uses_deepspeed(accelerator):
        return accelerator.unwrap_model(model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cpu_weights(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state_dict on the CPU (DeepSpeed's through Accelerate, which gathers its partitions)."""
    state = (accelerator.get_state_dict(model) if uses_deepspeed(accelerator)
             else unwrap(accelerator, model).state_dict())
    return {k: v.cpu() for k, v in state.items()}


def configure_deepspeed(accelerator: Accelerator, cfg: Config) -> None:
    """What DeepSpeed needs that a plain loop does not: its batch sizes, from our global batch size (we
    prepare no DataLoader for Accelerate to read them from)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    check_accumulation(ds.get("gradient_accumulation_steps"), cfg)
    accum = accelerator.gradient_accumulation_steps  # --grad-accum's steps times the forward passes of each
    ds.update(train_batch_size=cfg.batch_size, gradient_accumulation_steps=accum,
              train_micro_batch_size_per_gpu=cfg.batch_size // (accelerator.num_processes * accum))
    # The recipe's own optimizer under ZeRO-Offload too: else Accelerate swaps any optimizer for DeepSpeed's
    # CPU Adam with only its lr and weight decay (SGD at lr 0.2 silently becomes Adam at lr 0.2), an op
    # built with a C++ compiler on first use (minutes on 2 cores). A config that sets it keeps its choice.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        # DeepSpeed's own bf16 mode breaks convs and BatchNorm on CPU; its torch autocast mode works.
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def check_accumulation(value: Any, cfg: Config) -> None:
    """A DeepSpeed config's gradient_accumulation_steps (None or 'auto': ours) must be --grad-accum's."""
    if value not in (None, "auto", cfg.grad_accum, str(cfg.grad_accum)):
        raise ConfigError(f"the DeepSpeed config has gradient_accumulation_steps {value} but --grad-accum is "
                          f"{cfg.grad_accum}; make them equal")


def rank_digests(model: torch.nn.Module) -> list[str]:
    """Every rank's weight digest (collective): equal digests show the ranks hold the same model."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return gather_object([h.hexdigest()[:16]])
