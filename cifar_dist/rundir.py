"""The run directory: the guard that keeps two runs apart, checkpoints (atomic, rotated, resumed),
the metrics and summary files, the training state a checkpoint carries, and the preemption stop."""
from __future__ import annotations

import json
import os
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from cifar_dist.config import IDENTITY, Config, ConfigError, load_yaml, to_dict


class TrainState:
    """What a checkpoint needs beyond model/optimizer/RNG: progress and the metrics so far. A checkpoint
    taken mid-epoch (on a preemption signal) also holds the micro-batches done and their running sums."""

    FIELDS = ("epoch", "step", "seconds", "history", "batch", "partial")

    def __init__(self) -> None:
        self.epoch, self.step, self.seconds, self.history = 0, 0, 0.0, []
        self.batch, self.partial = 0, [0.0, 0.0, 0.0, 0.0]  # loss, correct, count, seconds of the epoch so far

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in self.FIELDS:
            setattr(self, k, d.get(k, getattr(self, k)))


class Preemption:
    """SIGUSR1 (SLURM's warning before a time limit or preemption) or SIGTERM: finish the step, save,
    exit cleanly. Ranks agree at the next log step, so all of them stop at the same place."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.installed = threading.current_thread() is threading.main_thread()  # not in a Tune trial thread
        for sig in (signal.SIGUSR1, signal.SIGTERM) if self.installed else ():
            signal.signal(sig, self.handle)

    def handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def requested(self, accelerator: Accelerator) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    def restore(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM) if self.installed else ():
            signal.signal(sig, signal.SIG_DFL)


# --- files of a run ---------------------------------------------------------------------------

def output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run's directory (the same on every rank), refusing paths that would mix two runs."""
    name = [cfg.output_dir or f"runs/{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"]
    broadcast_object_list(name)  # ranks start at slightly different times
    out = Path(name[0])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output dir {out} is a file")
    if diff := saved_differences(out, to_dict(cfg), IDENTITY):
        raise ConfigError(f"output dir {out} holds a run with another {', '.join(diff)}; "
                          "use a new --output-dir (nothing was changed)")
    # A directory without config.yaml must be empty, but for the checkpoints a Tune restore puts back.
    foreign = [p for p in out.iterdir() if p.name != "checkpoints"] if out.is_dir() else []
    if foreign and not (out / "config.yaml").exists():
        raise ConfigError(f"output dir {out} is not empty and holds no cifar-dist run (no config.yaml)")
    return out


def saved_differences(out: Path, wanted: dict[str, Any], keys: list[str]) -> list[str]:
    """Which of `keys` the run saved in out/config.yaml has with other values than `wanted` (none when
    out holds no run). IDENTITY refuses a directory; a benchmark compares all but INCIDENTAL."""
    saved = out / "config.yaml"
    if not saved.exists():
        return []
    old = load_yaml(saved)
    return [k for k in keys if old.get(k) != wanted[k]]


def finished_summary(out: Path, cfg: Config) -> dict[str, Any] | None:
    path = out / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("epochs_completed", 0) >= cfg.epochs:
            return summary
    return None


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("epoch-*") if not p.name.endswith(".tmp"))


def save_checkpoint(accelerator: Accelerator, out: Path, epoch: int | str, keep: int) -> None:
    """Write epoch-N.tmp, then rename: a kill mid-save never leaves a half checkpoint as the latest."""
    final = out / "checkpoints" / (f"epoch-{epoch:04d}" if isinstance(epoch, int) else f"epoch-{epoch}")
    tmp = final.with_name(final.name + ".tmp")
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)
        for old in checkpoints(out)[:-keep]:
            for f in sorted(old.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            old.rmdir()
    accelerator.wait_for_everyone()


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file of this process, then rename: a kill mid-write never leaves a half file, and
    two processes writing the same path (Tune trials sharing a cache) never write into one temporary file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl mirrors the checkpointed history: one line per completed epoch, never twice."""
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))


def save_results(accelerator: Accelerator, model: torch.nn.Module, out: Path, summary: dict[str, Any]) -> None:
    """Main process: model.pt (CPU tensors: loads anywhere), then summary.json, which marks the run done."""
    weights = {k: v.cpu() for k, v in accelerator.get_state_dict(model).items()}
    accelerator.save(weights, out / "model.pt")
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def save_preempted(accelerator: Accelerator, out: Path, state: TrainState, epochs_done: int, keep: int,
                   saved: bool) -> str:
    """The preemption stop: a mid-epoch checkpoint (it sorts between epoch-N and epoch-N+1) unless the
    epoch's own was just saved; returns the line that says what was kept."""
    if not saved:
        save_checkpoint(accelerator, out, f"{epochs_done:04d}+{state.batch:06d}", keep)  # epochs, micro-batches
    return (f"after {epochs_done} epochs and {state.batch} batches: checkpoint {checkpoints(out)[-1]} saved; "
            "rerun the same command to resume")


def resume(accelerator: Accelerator, path: Path, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Load a checkpoint, keeping this config's optimiser settings (lr, weight decay, ...): the
    command line wins, so a diverged run can be resumed with a lower --lr."""
    wanted = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} does not fit this run "
                          f"({str(e).splitlines()[0][:120]}); use a new --output-dir") from None
    for group, settings in zip(optimizer.param_groups, wanted):
        group.update(settings)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = lr * f(scheduler.last_epoch)
