"""The run directory: the guard that keeps two runs apart, checkpoints (atomic, rotated, checked,
resumed), the metrics and summary files, the training state a checkpoint carries, the preemption stop,
and what a failed write says."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from cifar_dist.card import model_card
from cifar_dist.config import IDENTITY, Config, ConfigError, load_yaml, to_dict


class TrainState:
    """What a checkpoint needs beyond model and optimizer: progress and the metrics so far. A checkpoint
    taken mid-epoch (on a preemption signal) also holds the global batches done and their running sums.
    Every resume is recorded (where, on how many processes, after how many elastic restarts).

    No random state: training draws nothing from the global generators (the data's draws are a function
    of seed and epoch, `data.epoch_plan`), so the per-process RNG files Accelerate writes restore nothing
    that matters, and a resume on more processes than saved them (which finds no file for the new ranks)
    changes nothing. They serve only to count the processes that saved a checkpoint (`saved_by`)."""

    FIELDS = ("epoch", "step", "seconds", "history", "batch", "partial", "resumes")

    def __init__(self) -> None:
        self.epoch, self.step, self.seconds = 0, 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.batch, self.partial = 0, [0.0, 0.0, 0.0, 0.0]  # loss, correct, count, seconds of the epoch so far
        self.resumes: list[dict[str, Any]] = []

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
    # A directory without config.yaml must be empty, but for the checkpoints a Tune restore puts back
    # (and the lock file of a run that stopped before writing its config).
    foreign = [p for p in out.iterdir() if p.name not in ("checkpoints", LOCK)] if out.is_dir() else []
    if foreign and not (out / "config.yaml").exists():
        raise ConfigError(f"output dir {out} is not empty and holds no cifar-dist run (no config.yaml)")
    return out


LOCK = ".lock"  # in the output directory: held (flock) by the main process of the run using it


def hold(out: Path, accelerator: Accelerator) -> IO[str] | None:
    """One run per output directory at a time: the main process takes an exclusive lock on out/.lock
    before anything of the run is written, and keeps it until the run ends; the OS releases it when the
    process dies (a kill, a lost node), so a rerun or a requeue resumes as usual. A second run on the
    directory of a live one is refused on every rank, having changed nothing. Returns the lock (main
    process) to close at the end. (flock works across processes of one host and on most cluster file
    systems; on NFS it depends on the mount's lock support.)"""
    handle: IO[str] | None = None
    refusal: list[str | None] = [None]
    if accelerator.is_main_process:
        handle, refusal[0] = take_lock(out)
    broadcast_object_list(refusal)
    if refusal[0]:
        raise ConfigError(refusal[0])
    return handle


def discard_unused(out: Path, accelerator: Accelerator) -> None:
    """A run directory this run made and then refused (bad data, found only once it was read): removed
    while nothing but the lock is in it, so a refusal leaves nothing behind."""
    if accelerator.is_main_process and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK}:
        (out / LOCK).unlink(missing_ok=True)
        out.rmdir()


def take_lock(out: Path) -> tuple[IO[str] | None, str | None]:
    """(the held lock file, None), or (None, why not): a live process holds it, or the file system gives
    no lock (an NFS mount without locking, a read-only folder)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a+")  # created if missing; an existing one is opened unchanged
    except OSError as e:
        return None, f"cannot lock output dir {out}: {e.strerror or e}"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, (f"output dir {out} is in use by a live run ({holder}); wait for it to end or use another "
                      "--output-dir (nothing was changed)")
    except OSError as e:
        handle.close()
        return None, f"cannot lock output dir {out} ({e.strerror or e}); use a folder on a file system with locks"
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
    handle.flush()
    return handle, None


def held(out: Path) -> bool:
    """Whether a live process holds out/.lock (what take_lock refuses as in use). Probed with a shared
    lock, which only an exclusive one blocks, so the lock file is neither taken nor rewritten. A file
    system without locks holds nothing."""
    try:
        with open(out / LOCK) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when f closes
    except BlockingIOError:
        return True
    except OSError:  # no lock file, or no locks here
        return False
    return False


def saved_differences(out: Path, wanted: dict[str, Any], keys: list[str]) -> list[str]:
    """Which of `keys` the run saved in out/config.yaml has with other values than `wanted` (none when
    out holds no run). IDENTITY refuses a directory; a benchmark compares all but INCIDENTAL."""
    saved = out / "config.yaml"
    if not saved.exists():
        return []
    defaults = to_dict(Config())  # a setting added since the run was saved: its default, the run's behaviour
    old = {**defaults, **load_yaml(saved)}
    old["model"] = {**defaults["model"], **(old.get("model") or {})}
    return [k for k in keys if old.get(k) != wanted[k]]


def finished_summary(out: Path, cfg: Config) -> dict[str, Any] | None:
    path = out / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("epochs_completed", 0) >= cfg.epochs:
            return summary
    return None


def checkpoints(out: Path) -> list[Path]:
    return epoch_dirs(out / "checkpoints")


def epoch_dirs(folder: Path) -> list[Path]:
    """The complete epoch checkpoints in a folder, oldest first (a half-written epoch-N.tmp is not one)."""
    return sorted(p for p in folder.glob("epoch-*") if not p.name.endswith(".tmp"))


def save_checkpoint(accelerator: Accelerator, out: Path, epoch: int | str, keep: int) -> None:
    """Write epoch-N.tmp with its manifest, then rename: a kill mid-save never leaves a half checkpoint as
    the latest, and a failed write (a full disk) leaves no .tmp behind."""
    final = out / "checkpoints" / (f"epoch-{epoch:04d}" if isinstance(epoch, int) else f"epoch-{epoch}")
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():  # the half save of a run killed while saving
        remove_tree(tmp)
    accelerator.wait_for_everyone()
    try:
        with writing(final):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_manifest(tmp)
    except WriteError:
        if accelerator.is_main_process and tmp.exists():
            remove_tree(tmp)
        raise
    if accelerator.is_main_process:
        tmp.rename(final)
        for old in checkpoints(out)[:-keep]:
            remove_tree(old)
    accelerator.wait_for_everyone()


# --- what makes a checkpoint whole ------------------------------------------------------------------

MANIFEST = "manifest.json"  # in every checkpoint, written last: each file's size and CRC-32


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): [p.stat().st_size, crc32(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps(files, indent=1) + "\n")


def crc32(path: Path) -> str:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def damage(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file cut short, changed or missing), or None when it
    reads back whole. A checkpoint without a manifest (written before there were manifests) is read:
    every file of it must deserialize."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return unreadable_file(folder)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for name, (size, crc) in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if (actual := path.stat().st_size) != size:
            return f"{name} has {actual:,} of its {size:,} bytes"
        if crc32(path) != crc:
            return f"{name} does not match its checksum"
    return None


def unreadable_file(folder: Path) -> str | None:
    """The first file of a checkpoint without a manifest that does not deserialize, and why."""
    from safetensors.torch import load_file

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix in (".bin", ".pt", ".pkl"):
                torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # each library words a cut file its own way
            return f"{path.name} does not read ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
    return None


def latest_readable(out: Path, accelerator: Accelerator) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that reads back whole, and a line for each newer one that does not, which is
    moved aside to checkpoints/damaged/ (never deleted). The main process checks; every rank gets its
    answer. When none reads, ConfigError, and nothing is moved."""
    answer: list[Any] = [None, [], None]  # the checkpoint, the lines, the refusal
    if accelerator.is_main_process:
        answer = choose_checkpoint(checkpoints(out))
    broadcast_object_list(answer)
    if answer[2]:
        raise ConfigError(answer[2])
    return answer[0], answer[1]


def choose_checkpoint(ckpts: list[Path]) -> list[Any]:
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(ckpts):
        if (why := damage(ckpt)) is None:
            lines = [f"checkpoint {bad} is damaged ({reason}): moved to {set_aside(bad)}; resuming from {ckpt}"
                     for bad, reason in damaged]
            return [ckpt, lines, None]
        damaged.append((ckpt, why))
    if not damaged:
        return [None, [], None]
    found = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    return [None, [], f"no readable checkpoint in {damaged[0][0].parent} ({found}); nothing was changed: move "
                      "the folder away to train from the start"]


def set_aside(ckpt: Path) -> Path:
    folder = ckpt.parent / "damaged"
    folder.mkdir(exist_ok=True)
    dest, n = folder / ckpt.name, 1
    while dest.exists():
        n += 1
        dest = folder / f"{ckpt.name}-{n}"
    ckpt.rename(dest)
    return dest


# --- writes that fail -------------------------------------------------------------------------------

class WriteError(Exception):
    """A file of the run could not be written: its path and the file system's reason (a full disk, a
    quota, a read-only mount)."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` (a file or a folder being filled) into one WriteError that names it
    and the system's reason. torch.save's C++ writer says only "unexpected pos" when the disk is full, and
    safetensors words it its own way: the file system is then asked directly, by a small probe write
    beside the path. An error the file system does not confirm is raised as it was."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    except Exception:
        if (reason := unwritable(path)) is None:
            raise
        raise WriteError(f"cannot write {path}: {reason}") from None


def unwritable(path: Path) -> str | None:
    """The file system's reason a write at `path` fails now (No space left on device, Disk quota exceeded,
    Read-only file system), or None when a 64 KiB probe written and synced beside it goes through."""
    folder = path if path.is_dir() else path.parent
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def remove_tree(folder: Path) -> None:
    for f in sorted(folder.rglob("*"), reverse=True):
        f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
    folder.rmdir()


def saved_by(path: Path) -> int:
    """How many processes saved a checkpoint: Accelerate writes one RNG file per process."""
    return len(list(path.glob("random_states_*.pkl")))


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """The temporary path to write `path` through, renamed over it when the block ends: a kill or a full
    disk mid-write never leaves a half file where a reader looks, and a failed write is a WriteError. It
    lies in a folder of this process's own beside `path`, under the same name: two processes writing one
    path (Tune trials sharing a cache) never share a temporary file, and torch.save, which records the
    file's name in the file, writes the same bytes as to `path` itself."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp" / path.name
    try:
        with writing(path):
            tmp.parent.mkdir(exist_ok=True)
            yield tmp
            tmp.replace(path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)  # what a failed write left


def write_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl mirrors the checkpointed history: one line per completed epoch, never twice."""
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))


def save_results(accelerator: Accelerator, weights: dict[str, torch.Tensor], out: Path,
                 summary: dict[str, Any]) -> None:
    """Main process: model.pt (the weights, CPU tensors: loads anywhere), model_card.md, then summary.json,
    which marks the run done. Each written whole or not at all."""
    with replacing(out / "model.pt") as tmp:
        accelerator.save(weights, tmp)
    write_atomic(out / "model_card.md", model_card(summary))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def save_preempted(accelerator: Accelerator, out: Path, state: TrainState, epochs_done: int, keep: int,
                   saved: bool) -> str:
    """The preemption stop: a mid-epoch checkpoint (it sorts between epoch-N and epoch-N+1) unless the
    epoch's own was just saved; returns the line that says what was kept."""
    if not saved:
        save_checkpoint(accelerator, out, f"{epochs_done:04d}+{state.batch:06d}", keep)  # epochs, global batches
    return (f"after {epochs_done} epochs and {state.batch} batches: checkpoint {checkpoints(out)[-1]} saved; "
            "rerun the same command to resume")


def resume(accelerator: Accelerator, path: Path, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LambdaLR, state: TrainState) -> int:
    """Load a checkpoint, keeping this config's optimiser settings (lr, weight decay, ...): the
    command line wins, so a diverged run can be resumed with a lower --lr. Any world size resumes a DDP
    checkpoint (one copy of the model and optimizer); returns the number of processes that saved it."""
    wanted = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    saved, world = saved_by(path), accelerator.num_processes
    if accelerator.distributed_type == DistributedType.DEEPSPEED and saved and saved != world:
        raise ConfigError(f"checkpoint {path} was saved by {saved} DeepSpeed processes and ZeRO cannot "
                          f"repartition its optimizer shards for {world}; resume on {saved} processes")
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
    state.resumes.append(dict(epoch=state.epoch, batch=state.batch, saved_by=saved, world_size=world,
                              elastic_restart=elastic_restarts()))
    return saved


def elastic_restarts() -> int:
    """How many times torch elastic (accelerate launch --max_restarts) restarted this process group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
