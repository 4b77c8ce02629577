"""Train a ResNet on CIFAR-10. Runs as `accelerate launch cifar_dist/train.py ...` (one or many
processes, DDP, mixed precision) or `python -m cifar_dist.train ...`. Reads top to bottom:
`train` (set up a `Run`, one call per epoch, finish), then the set-up, the epoch, the end of a run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the package comes from the install, not this folder
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from cifar_dist import auto, budget, flops, machine, pictures, tracking
from cifar_dist import data as D
from cifar_dist.auto import chosen_option
from cifar_dist.config import Config, ConfigError, resolve, save_yaml, to_dict
from cifar_dist.distributed import (
    configure_deepspeed,
    cpu_weights,
    make_accelerator,
    rank_digests,
    sync_batchnorm,
    unwrap,
    uses_deepspeed,
)
from cifar_dist.evaluate import evaluate
from cifar_dist.model import build_model, count_params, model_bytes, summarize
from cifar_dist.optim import Lookahead, lr_factors, make_optimizer, make_scheduler
from cifar_dist.progress import Progress
from cifar_dist.rundir import (
    Preemption,
    TrainState,
    WriteError,
    checkpoints,
    discard_unused,
    elastic_restarts,
    finished_summary,
    hold,
    latest_readable,
    output_dir,
    resume,
    save_checkpoint,
    save_preempted,
    save_results,
    write_metrics,
)

PROG = "cifar_dist.train"


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Run:
    """Everything one run holds, built once by `setup` and handed to every stage after it."""
    cfg: Config
    accelerator: Accelerator
    out: Path
    trackers: list[str]
    data: D.Data
    train_set: D.Split  # on the device
    evals: dict[str, D.Split]  # evaluated every eval epoch, on the device; the last one is the main split
    norm: D.Normalize
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lookahead: Lookahead | None
    state: TrainState
    steps_per_epoch: int
    # this machine's CPU threads and precision (cifar_dist.machine): mixed_precision is the one the run
    # trains in (DeepSpeed on CPU then turns bf16 into its own autocast setting), precision_probe what decided it
    choices: dict[str, Any]
    size: tuple[int, int]  # parameters and bytes of the model as built (DeepSpeed may cast what it prepares)
    clock: budget.Clock  # seconds since this process started
    confusion: torch.Tensor | None = None  # of the main split, at its last evaluation
    plan: budget.Plan | None = None  # --time-budget's
    trace: Path | None = None  # this rank's file of trained micro-batches ($CIFAR_DIST_TRACE, tests)
    slow_s: float = 0.0  # a pause after every step ($CIFAR_DIST_SLOW_STEP: a test's busy machine)
    resumed_seconds: float = 0.0  # trained before this process (a resume): a time budget counts them
    # a time budget's measure of the pace: (step, clock, evaluated epochs' end seconds so far) at its every look
    paces: list[tuple[int, float, float]] = field(default_factory=list)
    # the ends of the evaluated epochs in this process (evaluation, checkpoint, pictures, a search's report),
    # counted apart from the steps: in all, the last
    eval_seconds: tuple[float, float | None] = (0.0, None)
    curves_drawn: tuple[int, float] = (0, -math.inf)  # curves.png: the epoch it shows and the clock then

    @property
    def main(self) -> str:
        return list(self.evals)[-1]

    @property
    def total_steps(self) -> int:
        return total_steps(self.plan, self.steps_per_epoch, self.cfg.epochs)

    def first_images(self, n: int) -> D.Split:
        """The first n images of the main split: the same ones in every picture."""
        split = self.evals[self.main]
        return split.take(torch.arange(min(n, len(split))))


def total_steps(plan: budget.Plan | None, steps_per_epoch: int, epochs: int) -> int:
    """The steps of the whole run: its epochs', or as many as a time budget planned."""
    return plan.steps if plan is not None else steps_per_epoch * epochs


def say(accelerator: Accelerator, message: str) -> None:
    """Print once per run (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def train(cfg: Config, on_epoch: Callable[[dict[str, Any], Path], None] | None = None,
          deepspeed_plugin: Any = None, started_before: float = 0.0,
          auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) the run `cfg` describes; returns its summary. The one training loop: the CLI,
    Tune trials and SLURM jobs all come here. `on_epoch(metrics, checkpoint)` follows every epoch;
    `started_before`: the seconds this process ran before (a time budget counts them); `auto`: the choice
    of --preset auto that made `cfg` (cifar_dist.auto, kept in the plan)."""
    if cfg.preset == "auto":
        raise ConfigError("preset auto is chosen by train.py's command line; a Tune trial or a script names a preset")
    clock = budget.Clock(started_before)
    trackers = tracking.parse(cfg.tracker)
    accelerator, choices = make_accelerator(cfg, trackers, deepspeed_plugin)
    preemption, failed, lock = None, True, None
    out, made = None, False
    try:  # one teardown for every way out: the end, a preemption stop, an error
        out = output_dir(cfg, accelerator)
        made = not out.exists()
        lock = hold(out, accelerator)  # refused while another run uses the directory
        if cfg.time_budget and (kept := budget.saved(out)) is not None:
            cfg.epochs = kept.epochs  # a budgeted run's plan holds on resume
        if (done := finished_summary(out, cfg)) is not None:
            acc = ", ".join(f"{k} {v:.2%}" for k, v in done.items() if k in ("val_acc", "test_acc"))
            say(accelerator, f"{out} already finished {done['epochs_completed']} epochs ({acc}); nothing to do")
        else:
            run = setup(cfg, accelerator, out, trackers, choices, clock, auto)
            start_records(run)
            preemption = Preemption()  # from here on a signal stops training at a step, with a checkpoint
            done = run_epochs(run, preemption, on_epoch)
        failed = False
        return done
    except (ConfigError, D.DataError):
        if made and out is not None:
            discard_unused(out, accelerator)
        raise
    finally:
        teardown(accelerator, preemption, failed)
        if lock is not None:
            lock.close()


def run_epochs(run: Run, preemption: Preemption,
               on_epoch: Callable[[dict[str, Any], Path], None] | None) -> dict[str, Any]:
    """The epochs still to train, then the results; or a checkpoint and a stop when a signal came."""
    run.paces = []
    while (epoch := run.state.epoch) < run.cfg.epochs:  # a time budget may shorten the run as it goes
        if 0 < run.cfg.stop_after <= epoch:  # asked to stop here: a later command goes on
            draw_curves(run, final=True)
            say(run.accelerator, f"stopped after epoch {epoch} (--stop-after {run.cfg.stop_after}): checkpoint "
                                 f"{checkpoints(run.out)[-1]}; rerun with a later --stop-after, or 0, to go on")
            return {"stopped": True, "epoch": epoch}
        if (sums := train_epoch(run, epoch, preemption)) is None:
            return stop(run, epoch, preemption, saved=False)
        ended = time.perf_counter()
        metrics = end_epoch(run, epoch, sums)
        if on_epoch is not None:
            on_epoch(metrics, checkpoints(run.out)[-1])
        if f"{run.main}_acc" in metrics:
            took = time.perf_counter() - ended
            run.eval_seconds = (run.eval_seconds[0] + took, took)
        if run.state.epoch < run.cfg.epochs and preemption.requested(run.accelerator):
            return stop(run, epoch + 1, preemption, saved=True)
    return finish(run)


def teardown(accelerator: Accelerator, preemption: Preemption | None, failed: bool) -> None:
    """Signal handlers back to their defaults; trackers finished and the process group destroyed, a clean
    exit for every rank. After an error the trackers are closed as failed and the group is left to the
    exiting process (another rank may still be inside a collective)."""
    if preemption is not None:
        preemption.restore()
    if failed:
        tracking.finish_failed(accelerator)
    else:
        accelerator.end_training()


# --- set-up ----------------------------------------------------------------------------------------

def setup(cfg: Config, accelerator: Accelerator, out: Path, trackers: list[str], choices: dict[str, Any],
          clock: budget.Clock, auto: dict[str, Any] | None = None) -> Run:
    """The run directory, the data on the device, the plan of a time budget, the model and its
    optimisation, and a resume from the latest checkpoint when there is one. (The directory exists:
    `hold` made it, on every rank's behalf.)"""
    set_seed(cfg.seed)
    data, train_set, evals = load_splits(cfg, accelerator)
    plan = plan_budget(cfg, accelerator, out, choices, clock, len(train_set), sum(len(s) for s in evals.values()), auto)
    norm = D.Normalize(data.mean, data.std, cfg.channels_last).to(accelerator.device)
    model, optimizer, size = build(cfg, accelerator, train_set, norm)
    steps_per_epoch = len(train_set) // cfg.batch_size
    total = total_steps(plan, steps_per_epoch, cfg.epochs)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch, total)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    lookahead = None
    if cfg.lookahead:
        lookahead = Lookahead(unwrap(accelerator, model), total)
        accelerator.register_for_checkpointing(lookahead)
    run = Run(cfg, accelerator, out, trackers, data, train_set, evals, norm, model, optimizer, scheduler, lookahead,
              state, steps_per_epoch, choices, size, clock, plan=plan)
    ckpt, damaged = latest_readable(out, accelerator)  # a damaged newer one is set aside, with a line
    for line in damaged:
        say(accelerator, line)
    if ckpt is not None:
        saved_world = resume(accelerator, ckpt, optimizer, scheduler, state)
        # the budget's seconds before this process: the epochs', a mid-epoch checkpoint's part of one and the
        # first start-up (a later process's own start-up is in its clock; between-epoch writes are not counted)
        run.resumed_seconds = state.seconds + state.partial[3] + (plan.started_after_s if plan is not None else 0.0)
        restart = f"; elastic restart {elastic_restarts()}" if elastic_restarts() else ""
        say(accelerator, f"resumed from {ckpt} (epoch {state.epoch}, batch {state.batch}; saved by "
                         f"{saved_world} process(es), resumed on {accelerator.num_processes}{restart})")
    if folder := os.environ.get("CIFAR_DIST_TRACE"):
        run.trace = Path(folder) / f"rank{accelerator.process_index}-pid{os.getpid()}.jsonl"
    run.slow_s = float(os.environ.get("CIFAR_DIST_SLOW_STEP") or 0)
    return run


def plan_budget(cfg: Config, accelerator: Accelerator, out: Path, choices: dict[str, Any], clock: budget.Clock,
                train_images: int, eval_images: int, auto: dict[str, Any] | None = None) -> budget.Plan | None:
    """--time-budget: the plan kept in the run directory, else a new one from the main process's budget and
    measurement, on every rank alike; cfg.epochs becomes the plan's."""
    if not cfg.time_budget:
        return None
    plan = budget.saved(out)
    if plan is None:  # the main process's plan, from its clock, for every rank: they start moments apart
        made = main_plan(cfg, accelerator, choices, clock, auto, train_images, eval_images) \
            if accelerator.is_main_process else None
        plan = broadcast_object_list([made])[0]
        if isinstance(plan, str):  # every rank stops with the main process's line
            raise ConfigError(plan)
        if accelerator.is_main_process:
            budget.save(out, plan)
    cfg.epochs = plan.epochs
    return plan


def main_plan(cfg: Config, accelerator: Accelerator, choices: dict[str, Any], clock: budget.Clock,
              auto: dict[str, Any] | None, train_images: int, eval_images: int) -> budget.Plan | str:
    """The plan from the budget in seconds (slurm: this job's time left, asked once) and the world's training
    rate, from this config's own step (its optimizer, precision and micro-batch), which --preset auto
    measured already; or the line saying why there is none."""
    if auto is not None:
        budget_s, images_per_s = auto["budget_s"], chosen_option(auto)["images_per_s"]
    else:
        try:
            budget_s = budget.budget_seconds(cfg.time_budget, clock())
        except ConfigError as e:
            return str(e)
        micro = choices["micro_batch"]
        speed = machine.measure_micro(cfg, [micro], choices["mixed_precision"] == "bf16", accelerator.device,
                                      lambda model: make_optimizer(cfg, model), seconds=min(2.0, budget_s / 50))
        images_per_s = speed[micro] * accelerator.num_processes
    plan = budget.plan_steps(cfg, budget_s, clock(), images_per_s, train_images, eval_images)
    plan.auto = auto
    return plan


def load_splits(cfg: Config, accelerator: Accelerator) -> tuple[D.Data, D.Split, dict[str, D.Split]]:
    """The data, checked against the run. Evaluated every epoch: the validation hold-out (if any) and
    the test set (unless --no-eval-test: a Tune trial ranks on validation and never looks at it)."""
    with accelerator.main_process_first():  # one download, then every rank reads the files
        data = D.load_data(cfg)
    if cfg.model.num_classes < len(data.classes):
        raise ConfigError(f"num_classes {cfg.model.num_classes} is less than the dataset's {len(data.classes)} classes")
    if len(data.train) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({len(data.train)} images)")
    evals = {name: split.to(accelerator.device) for name, split in (("val", data.val), ("test", data.test))
             if split is not None and (name == "val" or cfg.eval_test)}
    if not evals:
        raise ConfigError("nothing to evaluate: --no-eval-test needs a validation split (--val-size N)")
    if small := [n for n, split in evals.items() if len(split) < accelerator.num_processes]:
        raise ConfigError(f"the {small[0]} set has fewer images than processes ({accelerator.num_processes}); "
                          "use a larger subset")
    return data, data.train.to(accelerator.device), evals


def build(cfg: Config, accelerator: Accelerator, train_set: D.Split,
          norm: D.Normalize) -> tuple[torch.nn.Module, torch.optim.Optimizer, tuple[int, int]]:
    """The model and its optimizer, prepared by Accelerate (DDP or DeepSpeed wrap them), and the size of
    the model as built."""
    deepspeed = uses_deepspeed(accelerator)
    if cfg.lookahead and deepspeed:
        raise ConfigError("--lookahead does not work under DeepSpeed (ZeRO keeps its own copy of the weights); "
                          "use --no-lookahead or the ddp backend")
    if cfg.optimizer == "muon" and deepspeed:
        raise ConfigError("--optimizer muon does not work under DeepSpeed (ZeRO hands the optimizer flat shards, "
                          "Muon needs whole filter banks); use the ddp backend")
    net = build_model(cfg.model)
    if cfg.model.stem == "whiten":  # from the first 5000 training images, the same on every rank
        net.init_whitening(norm(train_set.images[:5000]).cpu())
    model: torch.nn.Module = net
    size = count_params(model), model_bytes(model)
    if cfg.sync_bn and accelerator.num_processes > 1:  # BatchNorm of one process needs no synchronising
        model = sync_batchnorm(model, accelerator.device)
    if cfg.channels_last and not deepspeed:  # DeepSpeed's broadcast needs contiguous parameters
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the module and its state_dict names stay as they are (no `_orig_mod.`)
        model.compile()
    optimizer = make_optimizer(cfg, model)
    configure_deepspeed(accelerator, cfg)
    return *accelerator.prepare(model, optimizer), size


def start_records(run: Run) -> None:
    """Save the config (only now: a refused resume leaves the run's record as it was), start the
    trackers, and on the main process write the metrics so far, the model summary and input samples."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    if accelerator.is_main_process:
        save_yaml(cfg, out / "config.yaml")
    tracking.start(accelerator, run.trackers, to_dict(cfg), out, run.state.step, cfg.run_name, cfg.group)
    if not accelerator.is_main_process:
        return
    write_metrics(out, run.state.history)
    table = summarize(unwrap(accelerator, run.model), cfg.model.image_size)
    (out / "model_summary.txt").write_text(table + "\n")  # the layer table: there, not in every log
    samples = run.first_images(16)
    grid = pictures.sample_grid(samples.images, samples.labels, run.data.classes)
    pictures.publish(accelerator, run.trackers, {"samples": grid}, out, run.state.step)
    say(accelerator, f"{cfg.preset}: {run.size[0]:,} parameters, {run.size[1] / 2**20:.2f} MB; "
                     f"{len(run.train_set):,} train / {len(run.evals[run.main]):,} {run.main} images; "
                     f"{accelerator.num_processes} process(es) on {accelerator.device.type}{threads(run)}; "
                     f"output {out} (layers: model_summary.txt)")
    if run.data.note:
        say(accelerator, run.data.note)
    say(accelerator, precision_line(run))
    say(accelerator, micro_batch_line(run))
    if run.plan is not None:
        kept = f"time budget: the plan kept, {run.plan.steps:,} steps"
        say(accelerator, run.plan.line() if not run.state.epoch else kept)


def threads(run: Run) -> str:
    n, why = run.choices["cpu_threads"], run.choices.get("cpu_threads_from")
    return f" with {n} thread(s) each ({why})" if n else ""


def precision_line(run: Run) -> str:
    """The precision and why: what was asked, and the probe's measured bf16 speed-up where one ran."""
    c = run.choices
    asked, chosen = c["mixed_precision_asked"], c["mixed_precision"]
    notes = [f"asked {asked}"] if asked != chosen else []
    if asked == "auto" and chosen != "no" and machine.launch_default_precision():
        # accelerate launch without --mixed_precision has just printed that it "was set to a value of 'no'"
        notes.append("accelerate launch's 'no' above is its default, not a choice: --mixed-precision no for fp32")
    line = f"precision: {chosen}" + (f" ({'; '.join(notes)})" if notes else "")
    if probe := c["precision_probe"]:
        line += (f"; bf16 step {probe['speedup']:.2f}x fp32's speed on this CPU ({machine.measured_on(probe)}, "
                 f"{'cached' if probe['cached'] else 'measured now'})")
    return line


def micro_batch_line(run: Run) -> str:
    """The micro-batch and why: asked, or the probe's images/s at each size it timed."""
    c = run.choices
    whole = machine.whole_micro_batch(run.cfg, run.accelerator.num_processes)
    line = f"micro-batch: {c['micro_batch']} of {whole} images per process and step ({c['micro_batch_from']}"
    if probe := c["micro_batch_probe"]:
        speeds = ", ".join(f"{m}: {ips:,.0f}" for m, ips in probe["images_per_second"].items())
        line += f"; images/s {speeds}, {'cached' if probe['cached'] else 'measured now'}"
    group = run.cfg.model.bn_group
    return line + (f"); BatchNorm over groups of {group}" if group else "); BatchNorm over the micro-batch")


# --- an epoch --------------------------------------------------------------------------------------

def train_epoch(run: Run, epoch: int, preemption: Preemption) -> list[float] | None:
    """One epoch of steps, from a mid-epoch checkpoint's batch if resumed. Returns the world's loss sum,
    correct count, image count and the epoch's start time; None when a signal stopped it (its progress
    is then in run.state, for the checkpoint)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    accum = accelerator.gradient_accumulation_steps  # micro-batches per step
    t0 = time.perf_counter() - state.partial[3]
    run.model.train()
    # loss, correct, count of this rank; a mid-epoch checkpoint's sums are the whole world's, so rank 0
    # alone carries them on (the world may have another size after a requeue)
    sums = torch.tensor(state.partial[:3] if rank == 0 else [0.0] * 3, device=device, dtype=torch.float64)
    start, state.batch, state.partial = state.batch, 0, [0.0] * 4
    steps = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)  # a budget's last: maybe fewer
    bar = Progress(accelerator.is_main_process, f"epoch {epoch + 1}/{cfg.epochs}", steps, start,
                   cfg.batch_size, cfg.progress_seconds)
    batches = D.train_batches(run.train_set, cfg, epoch, rank, world, run.data.mean, start,
                              run.choices["micro_batch"])
    for i, batch in enumerate(batches):
        if state.step >= run.total_steps:  # a time budget's last epoch may end part-way (or resume there)
            break
        loss, logits = step(run, batch.images, batch.labels)
        if run.slow_s:
            time.sleep(run.slow_s)
        if run.trace is not None:
            trace(run, epoch, start + i // accum, batch)
        sums += torch.stack([loss.detach() * len(batch.labels), (logits.detach().argmax(1) == batch.labels).sum(),
                             torch.tensor(len(batch.labels), device=device)]).double()
        if accelerator.sync_gradients and state.step % cfg.log_every == 0:
            if check_in(run, loss, preemption, bar, epoch):
                bar.close()
                state.batch = start + (i + 1) // accum  # global batches done: the same on any world size
                state.partial = [*accelerator.reduce(sums, "sum").tolist(), time.perf_counter() - t0]
                return None
        if accelerator.sync_gradients:
            bar.step(sums)
            if run.plan is not None and state.step % replan_every(run.plan) == 0:
                keep_to_budget(run)
    bar.close()
    return [*accelerator.reduce(sums, "sum").tolist(), t0]


def trace(run: Run, epoch: int, position: int, batch: D.Batch) -> None:
    """$CIFAR_DIST_TRACE (a test's hook): this rank's micro-batch as trained, one JSON line: its global
    batch, the images' ids and a checksum of each augmented image (its pixels weighted by position)."""
    pixels = batch.images.reshape(len(batch.ids), -1).long().cpu()
    sums = (pixels * torch.arange(1, pixels.shape[1] + 1)).sum(1)
    line = dict(epoch=epoch, batch=position, rank=run.accelerator.process_index,
                world=run.accelerator.num_processes, ids=batch.ids.tolist(), pixels=sums.tolist())
    assert run.trace is not None
    with open(run.trace, "a") as f:
        f.write(json.dumps(line) + "\n")


def step(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: forward, backward, and (when the accumulation is complete) an optimizer step."""
    accelerator, state = run.accelerator, run.state
    with accelerator.accumulate(run.model):
        logits = run.model(run.norm(x))
        loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=run.cfg.label_smoothing)
        accelerator.backward(loss)
        run.optimizer.step()
        if accelerator.sync_gradients:
            run.scheduler.step()
            state.step += 1
            if run.lookahead is not None:
                run.lookahead.update(state.step)
        run.optimizer.zero_grad(set_to_none=True)
    return loss, logits


def check_in(run: Run, loss: torch.Tensor, preemption: Preemption, bar: Progress, epoch: int) -> bool:
    """Every log_every steps, on every rank alike (one host sync): log the loss, stop on NaN, and say
    whether any rank was signalled, so all ranks stop at the same step."""
    accelerator = run.accelerator
    signalled = torch.tensor(float(preemption.signal is not None), device=accelerator.device)
    world = accelerator.num_processes
    current, signalled = (accelerator.reduce(torch.stack([loss.detach().float(), signalled]), "sum") / world).tolist()
    if not math.isfinite(current):
        raise Diverged(f"training loss is {current} at epoch {epoch + 1}, step {run.state.step}")
    if signalled > 0:
        return True
    lr = run.scheduler.get_last_lr()[0]
    bar.show(loss=f"{current:.3f}", lr=f"{lr:.4g}")
    accelerator.log({"train/step_loss": current, "train/lr": lr}, step=run.state.step)
    return False


def end_epoch(run: Run, epoch: int, sums: list[float]) -> dict[str, Any]:
    """Metrics of the epoch (evaluated every eval_every epochs and after the last), its checkpoint,
    its log line, and the pictures that follow training."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    loss_sum, correct, count, t0 = sums
    train_seconds = time.perf_counter() - t0
    if not math.isfinite(loss_sum):
        raise Diverged(f"training loss is {loss_sum / count} at epoch {epoch + 1}")
    metrics: dict[str, Any] = dict(epoch=epoch + 1, train_loss=loss_sum / count, train_acc=correct / count)
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        for name, split in run.evals.items():
            metrics[f"{name}_loss"], metrics[f"{name}_acc"], run.confusion = evaluate(
                run.model, split, run.norm, cfg, accelerator)
    seconds = time.perf_counter() - t0
    metrics.update(lr=run.scheduler.get_last_lr()[0], seconds=seconds, images_per_second=count / train_seconds,
                   step=state.step)
    state.epoch, state.seconds = epoch + 1, state.seconds + seconds
    state.history.append(metrics)
    save_checkpoint(accelerator, run.out, state.epoch, cfg.keep_checkpoints)
    accelerator.log({f"{k.replace('_', '/', 1)}" if k.startswith(("train_", "val_", "test_")) else k: v
                     for k, v in metrics.items() if k != "step"}, step=state.step)
    if accelerator.is_main_process:
        write_metrics(run.out, state.history)
        draw_curves(run, final=state.epoch == cfg.epochs)
        if cfg.feature_maps_every and state.epoch % cfg.feature_maps_every == 0 and state.epoch < cfg.epochs:
            feature_maps(run, f"epoch-{state.epoch:04d}")
    say(accelerator, epoch_line(run, metrics))
    return metrics


def epoch_line(run: Run, m: dict[str, Any]) -> str:
    evals = "".join(f" | {n} loss {m[f'{n}_loss']:.4f} acc {m[f'{n}_acc']:6.2%}" for n in run.evals if f"{n}_acc" in m)
    return (f"epoch {m['epoch']:3d}/{run.cfg.epochs} | train loss {m['train_loss']:.4f} acc {m['train_acc']:6.2%}"
            f"{evals} | lr {m['lr']:.3g} | {m['images_per_second']:,.0f} img/s | {m['seconds']:.1f}s")


# A matplotlib figure costs a third of a CPU-second: after every epoch of a run whose epochs take seconds
# (a quick or synthetic run, a search's trials) that was a tenth of its time. The picture is for a person
# looking in now and then; metrics.jsonl and the trackers have every epoch at once.
CURVES_EVERY_S = 30.0


def draw_curves(run: Run, final: bool) -> None:
    """Main process: curves.png of every epoch so far, when CURVES_EVERY_S passed since the last one, or
    at the end of the run or of this part of it (a stop), unless it shows this epoch already."""
    epoch, at = run.curves_drawn
    due = final or run.clock() - at >= CURVES_EVERY_S
    if not run.accelerator.is_main_process or not run.state.history or epoch == run.state.epoch or not due:
        return
    pictures.save_png(pictures.curves_figure(run.state.history), run.out / "curves.png")
    run.curves_drawn = (run.state.epoch, run.clock())


def feature_maps(run: Run, tag: str) -> None:
    """Main process: feature maps of the same few images of the main split, every time."""
    probe = run.first_images(4)
    pictures.log_feature_maps(run.accelerator, run.trackers, run.model, run.norm(probe.images),
                              run.cfg.feature_channels, run.out / "feature_maps" / tag, run.state.step)


def replan_every(plan: budget.Plan) -> int:
    """How often (in steps) a budgeted run looks at its pace: some twenty times a run."""
    return max(1, plan.planned_steps // 20)


def keep_to_budget(run: Run) -> None:
    """Every replan_every steps: the plan moved to the pace measured since about a tenth of the run ago
    (evaluated epochs' ends apart: they are counted on their own), with the schedule laid over it anew. The main
    process's clock decides, for every rank alike."""
    plan, state, cfg = run.plan, run.state, run.cfg
    assert plan is not None
    run.paces.append((state.step, run.clock(), run.eval_seconds[0]))
    if len(run.paces) < 2:  # the first look only marks where the pace is measured from: after the first
        return              # steps' one-off costs
    window = max(replan_every(plan), plan.steps // 10)
    then = next(p for p in run.paces if p[0] >= state.step - window or p is run.paces[-2])
    now = run.paces[-1]
    step_s = (now[1] - then[1] - (now[2] - then[2])) / max(1, now[0] - then[0])
    eval_s = budget.end_estimate(plan, step_s, run.eval_seconds[1])
    spent, step_s, eval_s = broadcast_object_list([now[1] + run.resumed_seconds, step_s, eval_s])
    why = budget.replan(plan, state.step, spent, step_s, eval_s, cfg.eval_every)
    if why is None:
        return
    cfg.epochs = plan.epochs
    run.scheduler.lr_lambdas = lr_factors(cfg, run.optimizer, run.steps_per_epoch, plan.steps)
    if run.lookahead is not None:
        run.lookahead.total = plan.steps
        if state.step >= plan.steps:  # cut to end now: the weights become the EMA, as at a planned last step
            run.lookahead.update(state.step)
    if run.accelerator.is_main_process:
        budget.save(run.out, plan)
    say(run.accelerator, f"time budget: {why} the plan ({spent:.0f}s of {plan.budget_s:.0f}s spent after "
                         f"{state.step:,} steps, {step_s:.3g}s a step): {plan.steps:,} steps in all "
                         f"({plan.in_epochs(plan.steps):g} epochs)")


# --- the end of a run ------------------------------------------------------------------------------

def stop(run: Run, epochs_done: int, preemption: Preemption, saved: bool) -> dict[str, Any]:
    """A signal asked to stop: checkpoint where training is, so a rerun resumes there."""
    where = save_preempted(run.accelerator, run.out, run.state, epochs_done, run.cfg.keep_checkpoints, saved)
    draw_curves(run, final=True)
    say(run.accelerator, f"stopped by a signal ({preemption.signal or 'on another rank'}) {where}")
    run.accelerator.wait_for_everyone()
    return {"preempted": True, "epoch": epochs_done, "batch": run.state.batch}


def finish(run: Run) -> dict[str, Any]:
    """The final pictures, model.pt and summary.json (written last: it marks the run finished)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    if run.confusion is None:  # nothing trained in this process (killed after the last checkpoint)
        _, _, run.confusion = evaluate(run.model, run.evals[run.main], run.norm, cfg, accelerator)
    confusion = run.confusion.long().cpu().numpy()
    per_class = {c: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, c in enumerate(run.data.classes)}
    if accelerator.is_main_process:
        draw_curves(run, final=True)  # (a time budget may end a run before its planned last epoch)
        feature_maps(run, "final")
        samples = run.first_images(16)  # the start's samples.png again, with the trained model's answers
        answers = pictures.predictions(unwrap(accelerator, run.model), run.norm(samples.images))
        grid = pictures.sample_grid(samples.images, samples.labels, run.data.classes, predicted=answers)
        pictures.publish(accelerator, run.trackers, {"samples": grid}, run.out, state.step)
        figure = pictures.confusion_figure(confusion, run.data.classes)
        pictures.publish(accelerator, run.trackers, {"confusion_matrix": figure}, run.out, state.step)
        accelerator.log({f"{run.main}/acc_{c}": a for c, a in per_class.items()}, step=state.step)
    summary = summarize_run(run, per_class, rank_digests(run.model))
    if accelerator.is_main_process:
        save_results(accelerator, cpu_weights(accelerator, run.model), run.out, summary)
        say(accelerator, f"done: {run.main} acc {summary[f'{run.main}_acc']:.2%} "
                         f"(best {summary[f'best_{run.main}_acc']:.2%}) "
                         f"after {state.epoch} epochs, {state.seconds:.0f}s; results in {run.out}")
    accelerator.wait_for_everyone()
    return summary


def summarize_run(run: Run, per_class: dict[str, float], digests: list[str]) -> dict[str, Any]:
    """summary.json: the config, final and best accuracy per split, FLOPs, the machine and the world."""
    cfg, accelerator, history = run.cfg, run.accelerator, run.state.history
    summary: dict[str, Any] = dict(preset=cfg.preset, recipe=cfg.recipe, config=to_dict(cfg), main_split=run.main,
                                   classes=run.data.classes, data_note=run.data.note,
                                   images=dict(train=len(run.train_set), **{n: len(s) for n, s in run.evals.items()}))
    for name in run.evals:
        summary[f"{name}_acc"] = history[-1][f"{name}_acc"]
        summary[f"best_{name}_acc"] = max(m[f"{name}_acc"] for m in history if f"{name}_acc" in m)
    summary.update(flops.run_flops(cfg, len(run.train_set), sum(len(s) for s in run.evals.values()), run.state.step))
    summary.update(epochs_completed=run.state.epoch, params=run.size[0], model_bytes=run.size[1],
                   world_size=accelerator.num_processes, mixed_precision=run.choices["mixed_precision"],
                   precision_probe=run.choices["precision_probe"], cpu_threads=run.choices["cpu_threads"],
                   micro_batch=run.choices["micro_batch"], micro_batch_probe=run.choices["micro_batch_probe"],
                   device=accelerator.device.type, hardware=machine.hardware(accelerator.device),
                   deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                   total_seconds=run.state.seconds,
                   distributed_type=str(accelerator.distributed_type), engine=type(run.model).__name__,
                   rank_weight_digests=digests, restarts=elastic_restarts(), resumes=run.state.resumes,
                   **{f"per_class_{run.main}_acc": per_class},
                   normalization=dict(mean=list(run.data.mean), std=list(run.data.std)))
    if run.plan is not None:  # the plan and its outcome: the seconds used until the summary (not its write)
        summary["time_budget"] = dict(run.plan.record(), used_s=round(run.clock() + run.resumed_seconds, 1))
    return summary


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    # As a command, a budget counts this process's start-up too (the interpreter's, torch's); called from
    # Python (a notebook, a test), from the call
    clock = budget.Clock(budget.process_age() if argv is None else 0.0)
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, choice = resolve(argv), None
        if cfg.preset == "auto":
            cfg, choice = auto.choose(argv, clock)
        train(cfg, started_before=clock(), auto=choice)
    except (ConfigError, D.DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"{PROG}: error: {e}; stopped, the last good checkpoint is kept", file=sys.stderr)
        return 3
    except (WriteError, OSError) as e:  # a full disk, a quota, a read-only mount: the run is as it last was
        what = e if isinstance(e, WriteError) else f"{e.filename or 'a file'}: {e.strerror or e}"
        print(f"{PROG}: error: {what}; stopped, the last good checkpoint is kept: rerun the same command "
              "once the problem is solved", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
