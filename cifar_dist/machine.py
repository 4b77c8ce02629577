"""What the machine at hand gives a run: its CPU threads, the precision that trains fastest here, and
deterministic kernels when asked (--deterministic).

Two traps this module exists for. `accelerate launch` without a GPU sets OMP_NUM_THREADS=1 when the user
set no thread count, so a run used one core of many. And bf16 on a CPU is fast or slow depending on the
CPU (native AVX512-BF16/AMX, or emulated on AVX2: ~10x slower), which no flag can know in advance: a
short probe of the run's own training step measures it, once per machine and model (cached).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cifar_dist.config import Config
from cifar_dist.model import build_model
from cifar_dist.rundir import write_atomic

# bf16 trains when the probe measures its step at least this much faster than fp32; below, the noise of
# a few timed steps could pick either, and fp32 is the precision nothing can go wrong with.
BF16_MIN_SPEEDUP = 1.1
# An explicit bf16 on a CPU where its step is at least this many times slower than fp32 is warned about.
BF16_WARN_SLOWDOWN = 2.0
# The probe's batch: the run's per-process batch, at most this many images (an emulated bf16 step of 1,024
# `fast` images takes over a minute; the ratio of the two precisions is what is measured, not the step).
PROBE_MAX_BATCH = 256
PROBE_STEPS = 2  # timed steps of each precision, after one untimed step; the least counts (load only adds time)
# A first look at this many images, on one thread timed by its own CPU time: a bf16 step this many times
# slower than fp32's there is emulated bf16 (no AVX512-BF16/AMX), whatever the batch, and the probe ends
# (seconds, not a minute, on AVX2). The CPU time of one thread is what other processes cannot lengthen:
# beside the busy test suite, one wall-clock step of each read an AVX2 EPYC's emulated bf16 as 0.06-0.58x
# fp32 (and CI missed it once); its CPU time 0.07-0.13x, as idle.
PROBE_FIRST_BATCH = 16
PROBE_FIRST_STEPS = 1
EMULATED_SLOWDOWN = 4


# --- who launched us, and what they said ------------------------------------------------------------

@functools.cache  # the ancestors of a process do not change: read /proc once
def accelerate_launch() -> tuple[argparse.Namespace, dict[str, str]] | None:
    """The arguments and starting environment of the `accelerate launch` process this one runs under (the
    nearest such ancestor, read from /proc), or None (not launched by it, or not Linux). Accelerate puts
    its defaults into our environment; its own command line and environment say what the user set."""
    pid = os.getppid()
    for _ in range(8):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if (start := launch_start(argv)) is not None:
                pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                return launch_args(argv[start:]), dict(p.split("=", 1) for p in pairs if "=" in p)
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
    return None


def launch_start(argv: list[str]) -> int | None:
    """Where accelerate launch's own arguments start in a command line, or None if it is not one:
    `accelerate launch ...` (the console script, run by its python), `accelerate-launch ...`, or
    `python -m accelerate.commands.launch ...`."""
    for i, a in enumerate(argv[:3]):
        if a == "accelerate.commands.launch" or a.endswith("accelerate-launch"):
            return i + 1
        if (a.endswith("/accelerate") or a in ("accelerate", "accelerate.commands.accelerate_cli")) \
                and argv[i + 1:i + 2] == ["launch"]:
            return i + 2
    return None


def launch_args(args: list[str]) -> argparse.Namespace:
    """accelerate launch's arguments as its own parser reads them: the flags before the training script are
    its own (`mixed_precision`, `num_cpu_threads_per_process`, `config_file`: None when not given)."""
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser().parse_known_args([a for a in args if a])[0]


def _config_sets(config_file: str | None, key: str) -> bool:
    """Whether the accelerate config file the launch read (its --config_file, else accelerate's default
    file, which `accelerate config` writes with every key) sets `key`."""
    from accelerate.commands.config import default_config_file

    try:
        import yaml
        return (yaml.safe_load(Path(config_file or default_config_file).read_text()) or {}).get(key) is not None
    except (OSError, ValueError, AttributeError):
        return False


def launch_precision() -> str | None:
    """The mixed precision `accelerate launch` was explicitly given (its flag or its config file), or None
    when its ACCELERATE_MIXED_PRECISION is only its default ('no')."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if value is None:
        return None
    launch = accelerate_launch()
    if launch is None:  # cannot tell: a value other than its default must have been asked for
        return None if value == "no" else value
    args = launch[0]
    explicit = args.mixed_precision is not None or _config_sets(args.config_file, "mixed_precision")
    return value if explicit else None


def launch_default_precision() -> bool:
    """Whether `accelerate launch` set ACCELERATE_MIXED_PRECISION to its default 'no' without being asked."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") == "no" and launch_precision() is None


# --- CPU threads ------------------------------------------------------------------------------------

def cpu_threads(cfg: Config) -> tuple[int, str]:
    """How many threads this process computes with on a CPU, and why: --cpu-threads; else a count the user
    gave (OMP_NUM_THREADS, or accelerate launch --num_cpu_threads_per_process); else the cores this process
    may use (its affinity: a SLURM allocation, taskset) divided by the processes on this machine."""
    if cfg.cpu_threads:
        return cfg.cpu_threads, "--cpu-threads"
    launch = accelerate_launch()
    if launch is not None:
        args, launch_env = launch
        if args.num_cpu_threads_per_process:
            return int(args.num_cpu_threads_per_process), "accelerate launch --num_cpu_threads_per_process"
        user_omp = launch_env.get("OMP_NUM_THREADS", "")
    else:
        user_omp = os.environ.get("OMP_NUM_THREADS", "")
    if user_omp.strip().isdigit() and int(user_omp) > 0:
        return int(user_omp), "OMP_NUM_THREADS"
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores, source = allocated_cores()
    return max(1, cores // local_world), f"auto: {cores} cores{source} / {local_world} process(es)"


def allocated_cores() -> tuple[int, str]:
    """The cores this process may use, and where a count less than its affinity came from. In a SLURM job
    the allocation's own word counts too (SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE: our job scripts
    run one task per node): a cluster without task/affinity or cgroups leaves the mask at the whole node."""
    cores = usable_cores()
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:  # the first one set is the allocation's count
            return (int(value), f" ({name})") if int(value) < cores else (cores, "")
    return cores, ""


# --- determinism ------------------------------------------------------------------------------------

def use_deterministic_kernels(on: bool) -> None:
    """--deterministic: only deterministic kernels, so a rerun with the same seed on the same machine (and
    thread count) repeats every float; off: torch's defaults (a run sets both ways: the setting is the
    process's, and a Tune worker runs one trial after another). Called before the first CUDA call: cuBLAS
    reads its workspace setting once. An op without a deterministic kernel does not stop the run; one line
    names it. Only a change is made: torch's call imports its compiler's config (2-3 s at every start on a
    2-core CPU), and a process starts with it off."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if on != torch.are_deterministic_algorithms_enabled() or (
            on and not torch.is_deterministic_algorithms_warn_only_enabled()):
        torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False
    if on and not getattr(warnings.showwarning, "names_nondeterministic_ops", False):
        warnings.showwarning = _name_nondeterministic_op(warnings.showwarning)


def _name_nondeterministic_op(show: Callable[..., None]) -> Callable[..., None]:
    """torch's warning for such an op, shortened to one line, once per op (others pass through)."""
    named: set[str] = set()

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if "does not have a deterministic implementation" not in text:
            return show(message, category, filename, lineno, file, line)
        op = text.split(" does not have", 1)[0]
        if op not in named:
            named.add(op)
            print(f"--deterministic: {op} has no deterministic kernel; results may differ between runs",
                  file=sys.stderr, flush=True)

    showwarning.names_nondeterministic_ops = True  # type: ignore[attr-defined]
    return showwarning


# --- precision --------------------------------------------------------------------------------------

def choose_precision(asked: str, device: str, gpu_bf16: bool, speedup: float | None) -> tuple[str, str]:
    """The precision to train in and a warning ('' for none). `speedup` is the probe's fp32 step time over
    bf16's on this CPU (> 1: bf16 is faster). On a GPU, auto is bf16 where the GPU has it, else fp16 with
    Accelerate's gradient scaler: the GPUs without bf16 (V100, T4) have fast fp16 tensor cores."""
    if asked != "auto":
        if asked == "bf16" and device == "cpu" and speedup is not None and speedup <= 1 / BF16_WARN_SLOWDOWN:
            return asked, (f"warning: bf16 trains {1 / speedup:.1f}x slower than fp32 on this CPU (no native bf16); "
                           "--mixed-precision auto would choose fp32")
        return asked, ""
    if device == "cuda":
        return ("bf16" if gpu_bf16 else "fp16"), ""
    if device == "cpu" and speedup is not None and speedup >= BF16_MIN_SPEEDUP:
        return "bf16", ""
    return "no", ""


def probe_batch(cfg: Config, processes: int) -> int:
    """The precision probe's batch: the run's micro-batch, at most PROBE_MAX_BATCH, a whole number of
    BatchNorm groups."""
    batch = max(1, min(PROBE_MAX_BATCH, whole_micro_batch(cfg, processes)))
    group = cfg.model.bn_group
    return max(group, batch // group * group) if group else batch


def whole_micro_batch(cfg: Config, processes: int) -> int:
    """The images of one forward pass without --micro-batch: a process's share of one accumulation step."""
    return cfg.batch_size // (processes * cfg.grad_accum)


def probe_key(cfg: Config, batch: int) -> str:
    """What the probe's answer depends on: this CPU, this torch, the threads, the model and its batch."""
    spec = hashlib.sha256(json.dumps(cfg.model.__dict__, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return (f"{cpu_name()}|torch {torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|"
            f"{torch.get_num_threads()} threads|batch {batch}|channels_last {cfg.channels_last}|model {spec}")


def hardware(device: torch.device) -> str:
    """The machine a run trained on, in words: the GPU's name, or the CPU's and its cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} GPU on this node)"
    return (f"{cpu_name()}, {usable_cores()} cores (CPU only, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()})")


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "CPU")


def cache_path() -> Path:
    """$CIFAR_DIST_CACHE, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache) /cifar-dist."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("CIFAR_DIST_CACHE") or user_cache / "cifar-dist") / "precision-probe.json"


def read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def write_cache(key: str, result: dict[str, Any]) -> None:
    """Add one answer to the cache. Concurrent runs (Tune trials) each leave a whole file (the last one's
    entries); a read-only home leaves none, and the next run measures again."""
    cache = read_cache()
    cache[key] = result
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_path(), json.dumps(cache, indent=1))
    except OSError:
        pass


def measure(cfg: Config, batch: int) -> dict[str, float]:
    """Seconds per training step (forward, backward, SGD step) of this model in fp32 and in bf16 autocast
    (as Accelerate runs bf16 on a CPU), on random images. First at PROBE_FIRST_BATCH images: where bf16 is
    already EMULATED_SLOWDOWN times slower there, the answer is plain (no native bf16: AVX2) and that is it,
    for an emulated bf16 step of 256 `fast` images takes over half a minute. Else at `batch`, on every
    thread, by the wall clock: the speed a run will see."""
    torch.manual_seed(0)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model).to(memory_format=memory).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    group = cfg.model.bn_group or 1  # whole BatchNorm groups
    small = min(batch, max(group, PROBE_FIRST_BATCH // group * group))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = step_seconds(cfg, model, optimizer, small, timed=PROBE_FIRST_STEPS, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    if small == batch or emulated(first["speedup"]):
        return first
    return step_seconds(cfg, model, optimizer, batch, timed=PROBE_STEPS)


def emulated(speedup: float) -> bool:
    """Whether a measured bf16 speed-up (fp32's step time over bf16's) is that of an emulated bf16."""
    return speedup <= 1 / EMULATED_SLOWDOWN


def step_seconds(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int,
                 timed: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """One untimed step (it builds the oneDNN kernels), then `timed` timed steps of each precision, by
    `clock`; the least of each counts."""
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, cfg.model.image_size, cfg.model.image_size).to(memory_format=memory)
    y = torch.randint(0, cfg.model.num_classes, (batch,))
    seconds: dict[str, float] = {}
    for name in ("fp32", "bf16"):
        times = []
        for _ in range(timed + 1):
            t0 = clock()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(clock() - t0)
        seconds[name] = min(times[1:])
    return dict(fp32_step_s=seconds["fp32"], bf16_step_s=seconds["bf16"], speedup=seconds["fp32"] / seconds["bf16"],
                measured_batch=batch, measured_threads=torch.get_num_threads())


def measured_on(result: dict[str, Any]) -> str:
    """Where a probe's answer was measured: 'batch 16 on 1 thread' (the first look's batch where it ended
    there; the threads absent from a cache written before they were recorded)."""
    n = result.get("measured_threads")
    threads = f" on {n} thread{'s' if n != 1 else ''}" if n else ""
    return f"batch {result.get('measured_batch', result.get('batch'))}{threads}"


def probe(cfg: Config, processes: int) -> dict[str, Any]:
    """The bf16/fp32 speed of this run's training step on this CPU: from the cache, else measured and cached."""
    batch = probe_batch(cfg, processes)
    key = probe_key(cfg, batch)
    if (cached := read_cache().get(key)) is not None:
        return {**cached, "batch": batch, "cached": True}
    result = measure(cfg, batch)
    write_cache(key, result)
    return {**result, "batch": batch, "cached": False}


# --- micro-batch ------------------------------------------------------------------------------------

MICRO_CANDIDATES = 5  # sizes the micro-batch probe times at most: the smallest, the whole and between


def micro_candidates(whole: int, group: int) -> list[int]:
    """The micro-batches that keep a step's result: multiples of the BatchNorm group that divide the
    whole; at most MICRO_CANDIDATES of them, spread evenly on a log scale from the smallest to the whole."""
    sizes = [m for m in range(group, whole + 1, group) if whole % m == 0]
    if len(sizes) <= MICRO_CANDIDATES:
        return sizes
    logs = [math.log(m) for m in sizes]
    wanted = [logs[0] + i * (logs[-1] - logs[0]) / (MICRO_CANDIDATES - 1) for i in range(MICRO_CANDIDATES)]
    picks = {min(range(len(sizes)), key=lambda j: abs(logs[j] - w)) for w in wanted}
    return [sizes[j] for j in sorted(picks)]


def measure_micro(cfg: Config, sizes: list[int], bf16: bool, device: torch.device | None = None,
                  make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
                  seconds: float = 0.0) -> dict[int, float]:
    """Training images/s of this model's step at each micro-batch size, in the run's precision, on random
    images: one untimed step, then timed steps until MICRO_PROBE_S (or `seconds`) passed, at least two.
    SGD unless `make_optimizer` gives the run's own (the time budget's plan)."""
    torch.manual_seed(0)
    device = device or torch.device("cpu")
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model).to(device).to(memory_format=memory).train()
    optimizer = make_optimizer(model) if make_optimizer else torch.optim.SGD(model.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    speed = {}
    for size in sizes:
        side = cfg.model.image_size
        x = torch.randn(size, 3, side, side, device=device).contiguous(memory_format=memory)
        y = torch.randint(0, cfg.model.num_classes, (size,), device=device)
        steps, t0 = -1, 0.0
        while steps < 2 or time.perf_counter() - t0 < (seconds or MICRO_PROBE_S):
            if steps == 0:
                sync()
                t0 = time.perf_counter()  # after the untimed first step (oneDNN builds its kernels there)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        sync()
        speed[size] = steps * size / (time.perf_counter() - t0)
    return speed


MICRO_PROBE_S = 0.5  # timed seconds per candidate, at least (two steps)


def micro_probe(cfg: Config, processes: int, precision: str) -> dict[str, Any]:
    """--micro-batch auto on a CPU: the fastest candidate of this run's step, from the cache, else measured
    and cached. The images/s of each candidate are in the answer (summary.json, the bench)."""
    whole = whole_micro_batch(cfg, processes)
    sizes = micro_candidates(whole, cfg.model.bn_group)
    key = f"micro|{precision}|{'/'.join(map(str, sizes))}|{probe_key(cfg, whole)}"
    result = read_cache().get(key)
    was_cached = result is not None
    if result is None:
        speed = measure_micro(cfg, sizes, precision == "bf16")
        result = dict(images_per_second={str(m): round(v, 1) for m, v in speed.items()})
        write_cache(key, result)
    ips: dict[str, float] = result["images_per_second"]
    return dict(images_per_second=ips, best=int(max(ips, key=lambda m: ips[m])), cached=was_cached)
