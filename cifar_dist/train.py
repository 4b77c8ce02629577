"""Train a ResNet on CIFAR-10. Runs as `accelerate launch cifar_dist/train.py ...` (one or many
processes, DDP, mixed precision) or `python -m cifar_dist.train ...`. Reads top to bottom:
config -> accelerator -> output dir -> data -> model/optimizer -> resume -> epochs -> results.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: the package comes from the install, not this folder
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from cifar_dist import data as D
from cifar_dist import features as F
from cifar_dist import flops as FL
from cifar_dist import tracking
from cifar_dist.config import Config, ConfigError, resolve, save_yaml, load_yaml, to_dict
from cifar_dist.model import build_model, count_params, model_bytes, summarize

PROG = "cifar_dist.train"
# Settings that make a run what it is: a directory holding a run with other values is refused.
IDENTITY = ("model", "dataset", "train_subset", "val_size", "seed", "optimizer", "batch_size", "grad_accum",
            "lookahead")


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


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


class Lookahead:
    """airbench's lookahead EMA: every 5 steps the EMA moves toward the weights and the weights jump
    to the EMA. Its decay rises as 0.95^5 * progress^3 (early training is barely held back); at the
    last step the weights become the EMA. BatchNorm running statistics are averaged too."""

    def __init__(self, model: torch.nn.Module, total_steps: int, every: int = 5):
        self.tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}  # views of the weights
        self.ema = {k: v.detach().clone() for k, v in self.tensors.items()}
        self.total, self.every = total_steps, every

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every and step < self.total:
            return
        decay = 1.0 if step >= self.total else 0.95 ** 5 * (step / self.total) ** 3
        for k, v in self.tensors.items():
            self.ema[k].lerp_(v, 1 - decay)
            v.copy_(self.ema[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.ema.items()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        for k, v in self.ema.items():
            v.copy_(d[k])


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


# --- output directory --------------------------------------------------------------------------

def say(accelerator: Accelerator, message: str) -> None:
    """Print once per run (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run's directory (the same on every rank), refusing paths that would mix two runs."""
    name = [cfg.output_dir or f"runs/{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"]
    broadcast_object_list(name)  # ranks start at slightly different times
    out = Path(name[0])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output dir {out} is a file")
    saved = out / "config.yaml"
    if saved.exists():
        old = load_yaml(saved)
        new = to_dict(cfg)
        diff = [k for k in IDENTITY if old.get(k) != new[k]]
        if diff:
            raise ConfigError(f"output dir {out} holds a run with another {', '.join(diff)}; "
                              "use a new --output-dir (nothing was changed)")
    elif out.is_dir() and any(p.name != "checkpoints" for p in out.iterdir()):  # (a Tune restore brings those)
        raise ConfigError(f"output dir {out} is not empty and holds no cifar-dist run (no config.yaml)")
    return out


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


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl mirrors the checkpointed history: one line per completed epoch, never twice."""
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in history))
    tmp.replace(out / "metrics.jsonl")


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


# --- optimisation --------------------------------------------------------------------------------

def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One parameter group per kind: conv weights, biases, BatchNorm (lr x norm_lr_scale), the head
    (lr scaled down with its fan-in for SGD), a whitening stem's bias (frozen later by its lr factor).
    Weight decay on conv/linear weights only; with decay_all on everything, at the same rate per step."""
    head = model.head[-1]
    head_scale = cfg.head_lr_scale or (min(1.0, 512 / head.in_features) if cfg.optimizer == "sgd" else 1.0)
    head_ids = {id(p) for p in head.parameters()}
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    stem_bias = model.stem[0].bias if cfg.model.stem == "whiten" else None

    def kind(p: torch.nn.Parameter) -> str:
        if id(p) in head_ids:
            return "head" if p.ndim > 1 else "head_bias"
        if p is stem_bias:
            return "stem_bias"
        return "norm" if id(p) in norm_ids else "weights" if p.ndim > 1 else "biases"

    scales = dict(weights=1.0, biases=1.0, norm=cfg.norm_lr_scale, head=head_scale, head_bias=head_scale, stem_bias=1.0)
    groups = []
    for name, scale in scales.items():
        params = [p for p in model.parameters() if p.requires_grad and kind(p) == name]
        decay = cfg.weight_decay / scale if cfg.decay_all else cfg.weight_decay if name in ("weights", "head") else 0.0
        if params:
            groups.append(dict(params=params, weight_decay=decay, lr=cfg.lr * scale, name=name))
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           foreach=True)


def lr_factor(cfg: Config, total_steps: int) -> Callable[[int], float]:
    warm = int(cfg.warmup * total_steps)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm:
            return cfg.lr_start + (1 - cfg.lr_start) * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "onecycle":
            return 1.0 - t * (1 - cfg.lr_end)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def lr_factors(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> list[Callable[[int], float]]:
    """The schedule for every group; a whitening stem's bias stops (lr 0) after whiten_bias_epochs."""
    factor = lr_factor(cfg, steps_per_epoch * cfg.epochs)
    frozen_from = cfg.whiten_bias_epochs * steps_per_epoch

    def stem_bias(step: int) -> float:
        return factor(step) if step < frozen_from else 0.0

    return [stem_bias if g.get("name") == "stem_bias" else factor for g in optimizer.param_groups]


def evaluate(model: torch.nn.Module, split: D.Split, norm: D.Normalize, cfg: Config,
             accelerator: Accelerator) -> tuple[float, float, torch.Tensor]:
    """Loss, accuracy and confusion matrix (rows: true class) over a whole eval split, each image
    counted once across ranks."""
    model.eval()
    k = cfg.model.num_classes
    loss = torch.zeros(1, device=accelerator.device, dtype=torch.float64)
    confusion = torch.zeros(k * k, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for x, y in D.eval_batches(split, cfg.eval_batch_size, accelerator.process_index, accelerator.num_processes):
            logits = predict(model, norm(x), cfg.tta)
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
            confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k).double()
    loss, confusion = accelerator.reduce(torch.cat([loss, confusion]), "sum").split([1, k * k])
    model.train()
    count = confusion.sum().item()
    return loss.item() / max(count, 1), confusion.view(k, k).diagonal().sum().item() / max(count, 1), confusion.view(k, k)


def predict(model: torch.nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits, averaged over test-time augmentations: flip averages with the mirror image;
    flip-translate (airbench's 6 views) gives that half the weight and the mirrored pair of each
    1-pixel diagonal shift (up-left, down-right) a quarter each."""
    if tta == "none":
        return model(x).float()
    logits = 0.5 * (model(x).float() + model(x.flip(-1)).float())
    if tta == "flip-translate":
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [predict(model, view, "flip") for view in (padded[..., :h, :w], padded[..., 2:, 2:])]
        return 0.5 * logits + 0.25 * (shifted[0] + shifted[1])
    return logits


def log_feature_maps(accelerator: Accelerator, trackers: list[str], model: torch.nn.Module, images: torch.Tensor,
                     cfg: Config, out: Path, tag: str, step: int) -> None:
    """Main process only: feature-map grids of the stem and every block, as PNGs and to the trackers."""
    grids = F.feature_maps(accelerator.unwrap_model(model), images, cfg.feature_channels)
    for name, grid in grids.items():
        F.save_png(grid, out / "feature_maps" / tag / f"{name}.png")
    tracking.log_images(accelerator, trackers, {f"features/{k}": v for k, v in grids.items()}, step)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --- the run -------------------------------------------------------------------------------------

def train(cfg: Config, on_epoch: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run `cfg` describes; returns its summary. The one training loop:
    the CLI, Tune trials and SLURM jobs all come here."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    if deepspeed and (missing := [m for m in ("deepspeed", "transformers") if importlib.util.find_spec(m) is None]):
        raise ConfigError(f"DeepSpeed was asked for but {' and '.join(missing)} is not installed: "
                          "pip install -e '.[deepspeed]'")
    trackers = tracking.parse(cfg.tracker)
    cuda = torch.cuda.is_available()
    # Without a GPU, Accelerate only sees a multi-process world (torchrun, Ray Train) when told it runs on
    # CPU; but not under DeepSpeed, which that would silently turn into plain DDP. DeepSpeed on CPU needs
    # gloo named, or it asks for a GPU backend and sees a world of one.
    cpu_world = not cuda and not deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1
    process_group = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision or None, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=trackers or None, project_dir=cfg.output_dir or "runs", cpu=cpu_world,
                              kwargs_handlers=process_group)
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 on CPU")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                          f"({world} x {cfg.grad_accum})")
    out = output_dir(cfg, accelerator)
    if (done := finished_summary(out, cfg)) is not None:
        acc = ", ".join(f"{k} {v:.2%}" for k, v in done.items() if k in ("val_acc", "test_acc"))
        say(accelerator, f"{out} already finished {done['epochs_completed']} epochs ({acc}); nothing to do")
        return done
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    set_seed(cfg.seed)
    with accelerator.main_process_first():  # one download, then every rank reads the files
        data = D.load_data(cfg)
    if cfg.model.num_classes < len(data.classes):
        raise ConfigError(f"num_classes {cfg.model.num_classes} is less than the dataset's {len(data.classes)} classes")
    if len(data.train) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({len(data.train)} images)")
    device = accelerator.device
    train_set = data.train.to(device)
    # Evaluated every epoch: the validation hold-out (if any) and the test set (unless --no-eval-test:
    # a Tune trial ranks on validation and never looks at the test set). The last one is "main".
    evals = {name: split.to(device) for name, split in (("val", data.val), ("test", data.test))
             if split is not None and (name == "val" or cfg.eval_test)}
    if not evals:
        raise ConfigError("nothing to evaluate: --no-eval-test needs a validation split (--val-size N)")
    if small := [n for n, split in evals.items() if len(split) < world]:
        raise ConfigError(f"the {small[0]} set has fewer images than processes ({world}); use a larger subset")
    main_name = list(evals)[-1]
    main_set = evals[main_name]
    norm = D.Normalize(data.mean, data.std, cfg.channels_last).to(device)

    if cfg.lookahead and deepspeed:
        raise ConfigError("--lookahead does not work under DeepSpeed (ZeRO keeps its own copy of the weights); "
                          "use --no-lookahead or the ddp backend")
    model = build_model(cfg.model)
    if cfg.model.stem == "whiten":  # from the first 5000 training images, the same on every rank
        model.init_whitening(norm(train_set.images[:5000]).cpu())
    params, nbytes = count_params(model), model_bytes(model)
    if cfg.channels_last and accelerator.state.deepspeed_plugin is None:  # DeepSpeed's broadcast needs contiguous
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the module and its state_dict names stay as they are (no `_orig_mod.`)
        model.compile()
    optimizer = make_optimizer(cfg, model)
    precision = accelerator.mixed_precision  # (DeepSpeed on CPU turns it into its own autocast setting)
    configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    steps_per_epoch = len(train_set) // cfg.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(cfg, optimizer, steps_per_epoch))
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    lookahead = Lookahead(accelerator.unwrap_model(model), steps_per_epoch * cfg.epochs) if cfg.lookahead else None
    if lookahead is not None:
        accelerator.register_for_checkpointing(lookahead)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    if ckpts := checkpoints(out):
        resume(accelerator, ckpts[-1], optimizer, scheduler)
        say(accelerator, f"resumed from {ckpts[-1]} (epoch {state.epoch})")
    if accelerator.is_main_process:  # only now: a refused resume leaves the run's record as it was
        save_yaml(cfg, out / "config.yaml")
    tracking.start(accelerator, trackers, to_dict(cfg), out, state.step, cfg.run_name, cfg.group)
    probe = main_set.take(torch.arange(min(4, len(main_set))))  # the same images every time
    if accelerator.is_main_process:
        write_metrics(out, state.history)
        table = summarize(accelerator.unwrap_model(model))
        (out / "model_summary.txt").write_text(table + "\n")
        say(accelerator, table)
        samples = main_set.take(torch.arange(min(16, len(main_set))))
        pictures = {"samples": F.sample_grid(samples.images, samples.labels, data.classes)}
        F.save_png(pictures["samples"], out / "samples.png")
        tracking.log_images(accelerator, trackers, pictures, state.step)
        say(accelerator, f"{cfg.preset}: {params:,} parameters, {nbytes / 2**20:.2f} MB; {len(train_set):,} train / "
                          f"{len(main_set):,} {main_name} images; {world} process(es) on {device.type}, "
                          f"mixed precision {accelerator.mixed_precision}; output {out}")

    start_epoch = state.epoch
    preemption = Preemption()
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.perf_counter() - state.partial[3]
        model.train()
        # loss, correct, count of this rank; a mid-epoch checkpoint's sums are the whole world's, so rank 0
        # alone carries them on (the world may have another size after a requeue)
        sums = torch.tensor(state.partial[:3] if rank == 0 else [0.0] * 3, device=device, dtype=torch.float64)
        skip, state.batch, state.partial = state.batch, 0, [0.0] * 4
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (accelerator.is_local_main_process and sys.stderr.isatty()))
        for i, (x, y) in enumerate(D.train_batches(train_set, cfg, epoch, rank, world, data.mean)):
            if i < skip:  # resumed mid-epoch: the batches (and their augmentations) are drawn again, not trained
                continue
            with accelerator.accumulate(model):
                logits = model(norm(x))
                loss = criterion(logits, y)
                accelerator.backward(loss)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                    state.step += 1
                    if lookahead is not None:
                        lookahead.update(state.step)
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach() * len(y), (logits.detach().argmax(1) == y).sum(),
                                 torch.tensor(len(y), device=device)]).double()
            if accelerator.sync_gradients and (state.step % cfg.log_every == 0):
                # one host sync every log_every steps, on every rank alike, so all stop together (NaN, signal)
                stop = torch.tensor(float(preemption.signal is not None), device=device)
                current, stop = (accelerator.reduce(torch.stack([loss.detach().float(), stop]), "sum") / world).tolist()
                if not math.isfinite(current):
                    raise Diverged(f"training loss is {current} at epoch {epoch + 1}, step {state.step}")
                if stop > 0:
                    bar.close()
                    state.batch, state.partial = i + 1, [*accelerator.reduce(sums, "sum").tolist(),
                                                         time.perf_counter() - t0]
                    return stop_and_save(accelerator, out, state, epoch, cfg, preemption)
                bar.set_postfix(loss=f"{current:.3f}", lr=f"{scheduler.get_last_lr()[0]:.4g}")
                accelerator.log({"train/step_loss": current, "train/lr": scheduler.get_last_lr()[0]}, step=state.step)
            if accelerator.sync_gradients:
                bar.update(1)
        bar.close()
        loss_sum, correct, count = accelerator.reduce(sums, "sum").tolist()
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(loss_sum):
            raise Diverged(f"training loss is {loss_sum / count} at epoch {epoch + 1}")
        metrics = dict(epoch=epoch + 1, train_loss=loss_sum / count, train_acc=correct / count)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            for name, split in evals.items():
                metrics[f"{name}_loss"], metrics[f"{name}_acc"], confusion = evaluate(model, split, norm, cfg, accelerator)
        seconds = time.perf_counter() - t0
        metrics.update(lr=scheduler.get_last_lr()[0], seconds=seconds, images_per_second=count / train_seconds,
                       step=state.step)
        state.epoch, state.seconds = epoch + 1, state.seconds + seconds
        state.history.append(metrics)
        save_checkpoint(accelerator, out, state.epoch, cfg.keep_checkpoints)
        accelerator.log({f"{k.replace('_', '/', 1)}" if k.startswith(("train_", "val_", "test_")) else k: v
                         for k, v in metrics.items() if k != "step"}, step=state.step)
        if accelerator.is_main_process:
            write_metrics(out, state.history)
            F.save_png(F.curves_figure(state.history), out / "curves.png")
            if cfg.feature_maps_every and state.epoch % cfg.feature_maps_every == 0 and state.epoch < cfg.epochs:
                log_feature_maps(accelerator, trackers, model, norm(probe.images), cfg, out, f"epoch-{state.epoch:04d}",
                                 state.step)
        say(accelerator, 
            f"epoch {epoch + 1:3d}/{cfg.epochs} | train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:6.2%}"
            + "".join(f" | {n} loss {metrics[f'{n}_loss']:.4f} acc {metrics[f'{n}_acc']:6.2%}" for n in evals
                      if f"{n}_acc" in metrics)
            + f" | lr {metrics['lr']:.3g} | {metrics['images_per_second']:,.0f} img/s | {seconds:.1f}s")
        if on_epoch is not None:
            on_epoch(metrics, checkpoints(out)[-1])
        if state.epoch < cfg.epochs and preemption.requested(accelerator):
            return stop_and_save(accelerator, out, state, epoch + 1, cfg, preemption, saved=True)

    if state.epoch == start_epoch:  # nothing trained in this process (killed after the last checkpoint)
        _, _, confusion = evaluate(model, main_set, norm, cfg, accelerator)
    confusion = confusion.long().cpu().numpy()
    per_class = {c: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, c in enumerate(data.classes)}
    if accelerator.is_main_process:
        log_feature_maps(accelerator, trackers, model, norm(probe.images), cfg, out, "final", state.step)
        pictures = {"confusion_matrix": F.confusion_figure(confusion, data.classes)}
        F.save_png(pictures["confusion_matrix"], out / "confusion_matrix.png")
        tracking.log_images(accelerator, trackers, pictures, state.step)
        accelerator.log({f"{main_name}/acc_{c}": a for c, a in per_class.items()}, step=state.step)
    digests = gather_object([weights_digest(model)])
    summary = dict(preset=cfg.preset, recipe=cfg.recipe, config=to_dict(cfg))
    for name in evals:
        summary[f"{name}_acc"] = state.history[-1][f"{name}_acc"]
        summary[f"best_{name}_acc"] = max(m[f"{name}_acc"] for m in state.history if f"{name}_acc" in m)
    summary.update(FL.run_flops(cfg, len(train_set), sum(len(s) for s in evals.values())))
    summary.update(epochs_completed=state.epoch, params=params, model_bytes=nbytes, world_size=world,
                   mixed_precision=precision, device=device.type, total_seconds=state.seconds,
                   distributed_type=str(accelerator.distributed_type), engine=type(model).__name__,
                   rank_weight_digests=digests, **{f"per_class_{main_name}_acc": per_class},
                   normalization=dict(mean=list(data.mean), std=list(data.std)))
    if accelerator.is_main_process:
        weights = {k: v.cpu() for k, v in accelerator.get_state_dict(model).items()}
        accelerator.save(weights, out / "model.pt")  # CPU tensors: loads anywhere
        (out / "summary.json.tmp").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.json.tmp").replace(out / "summary.json")  # a kill mid-write leaves no half file
        say(accelerator, f"done: {main_name} acc {summary[f'{main_name}_acc']:.2%} "
                          f"(best {summary[f'best_{main_name}_acc']:.2%}) "
                          f"after {state.epoch} epochs, {state.seconds:.0f}s; results in {out}")
    preemption.restore()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: a clean exit for every rank
    return summary


def stop_and_save(accelerator: Accelerator, out: Path, state: TrainState, epoch: int, cfg: Config,
                  preemption: Preemption, saved: bool = False) -> dict[str, Any]:
    """Save a mid-epoch checkpoint (it sorts between epoch-N and epoch-N+1), unless the epoch's own was
    just saved, and end the run cleanly."""
    name = f"{epoch:04d}+{state.batch:06d}"  # epochs done, then micro-batches of the next
    if not saved:
        save_checkpoint(accelerator, out, name, cfg.keep_checkpoints)
    say(accelerator, f"stopped by a signal ({preemption.signal or 'on another rank'}) after {epoch} epochs "
                      f"and {state.batch} batches: checkpoint {checkpoints(out)[-1]} saved; "
                      "rerun the same command to resume")
    preemption.restore()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"preempted": True, "epoch": epoch, "batch": state.batch}


def main(argv: list[str] | None = None) -> int:
    try:
        train(resolve(sys.argv[1:] if argv is None else argv))
    except (ConfigError, D.DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"{PROG}: error: {e}; stopped, the last good checkpoint is kept", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
