"""Training to a deadline (--time-budget 10m): the epochs that fit this machine, planned before the first
step from a measurement of this config's own training step, and shortened at an epoch's end when the
measured pace falls behind (a busy machine). The recipe's schedule is laid over the planned epochs.

The plan is kept in the run directory (plan.json), so a resumed run keeps its epochs and its deadline
counts the time already trained. Epochs are the unit: the run always ends after an evaluated epoch,
with its checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifar_dist.auto import line
from cifar_dist.config import Config, ConfigError
from cifar_dist.flops import tta_views

# What the end of a run takes after its last evaluation (the final pictures, model.pt, summary.json) and
# what the pace may wobble by: kept free of the plan.
RESERVE_S, RESERVE_FRACTION = 3.0, 0.03
EVAL_COST = 1 / 3  # an evaluated image costs about a third of a trained one (a forward, no backward)
UNITS = {"h": 3600, "m": 60, "s": 1}
# --time-budget slurm: the job's time left, less this margin, unless one is written ("slurm-30s"): slurm/train.sh
# asks for USR1 180 s before the limit to checkpoint and requeue, and a budgeted job should end before that.
SLURM_MARGIN = "200s"


NO_JOB = "time_budget slurm needs a SLURM job (SLURM_JOB_ID is not set); give a duration instead"


def slurm_margin(text: str) -> float | None:
    """The margin of `slurm[-margin]` in seconds; None for a plain duration."""
    word, _, margin = text.strip().lower().partition("-")
    return parse_duration(margin or SLURM_MARGIN) if word == "slurm" else None


def check_budget(text: str) -> None:
    """A ConfigError unless `text` is a duration, or `slurm[-margin]` inside a SLURM job."""
    if slurm_margin(text) is None:
        parse_duration(text)
    elif not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError(NO_JOB)


def budget_seconds(text: str, age_s: float) -> float:
    """The budget of --time-budget in seconds from this process's start, `age_s` seconds ago: a duration,
    or `slurm[-margin]`, this SLURM job's time left now less the margin (ConfigError outside a job)."""
    margin_s = slurm_margin(text)
    if margin_s is None:
        return parse_duration(text)
    left = slurm_time_left()
    if left - margin_s < 1:
        raise ConfigError(f"time_budget {text!r}: the SLURM job has {left:.0f}s left, not more than the "
                          f"{margin_s:.0f}s kept for its end; give it a longer --time or a smaller margin (slurm-30s)")
    return age_s + left - margin_s


def slurm_time_left() -> float:
    """Seconds until this SLURM job's time limit, as squeue reports it (%L: [days-][hours:]minutes:seconds)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job:
        raise ConfigError(NO_JOB)
    try:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"time_budget slurm: squeue could not tell job {job}'s time left ({e})") from None
    left = r.stdout.strip()
    if r.returncode != 0 or not re.fullmatch(r"(\d+-)?(\d+:){1,2}\d+", left):
        raise ConfigError(f"time_budget slurm: job {job} has no time limit squeue can tell "
                          f"({(left or r.stderr.strip())[:80]!r}); give a duration instead")
    days, _, clock = left.rpartition("-")
    seconds = sum(int(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":"))))
    return seconds + 86400 * int(days or 0)


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h30m', '2.5m' or plain seconds ('600') -> seconds; a ConfigError otherwise."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    elif re.fullmatch(r"(\d+(\.\d+)?[hms])+", t):
        seconds = sum(float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", t))
    else:
        raise ConfigError(f"time_budget {text!r} is not a duration; write e.g. 90s, 10m or 1h30m")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time_budget must be positive, got {text!r}")
    return seconds


@dataclass
class Plan:
    """A budgeted run's plan and what became of it (plan.json, summary.json)."""
    budget_s: float
    epochs: int  # planned now (after any shortening)
    planned_epochs: int  # at the start
    expected_s: float  # of the whole run, as planned at the start
    images_per_s: float  # the training rate the plan used (whole world)
    epoch_s: float  # one epoch's training and evaluation as planned
    started_after_s: float  # the run's own start-up before the plan (data, probes, the measurement)
    shortened: list[dict[str, Any]] = field(default_factory=list)  # {after_epoch, epochs, pace_s}
    auto: dict[str, Any] | None = None  # --preset auto's choice (cifar_dist.auto.record)

    def line(self) -> str:
        over = ("; one epoch does not fit: it will run past the budget (a smaller preset or a longer budget)"
                if self.expected_s > self.budget_s else "")
        text = (f"time budget {self.budget_s:.0f}s: {self.epochs} epochs planned, expected {self.expected_s:.0f}s "
                f"({self.epoch_s:.1f}s an epoch at {self.images_per_s:,.0f} training images/s measured now, "
                f"{self.started_after_s:.0f}s of start-up){over}")
        if self.auto:
            text = f"{line(self.auto)}\n{text}"
        return text


def plan_epochs(cfg: Config, budget_s: float, spent_s: float, images_per_s: float, train_images: int,
                eval_images: int) -> Plan:
    """The most epochs whose training, evaluations and final writes fit in what is left of the budget
    (at least one: a run always ends evaluated). `images_per_s` is the world's training rate."""
    train_s = train_images // cfg.batch_size * cfg.batch_size / images_per_s
    eval_s = eval_images * tta_views(cfg.tta) * EVAL_COST / images_per_s
    free = budget_s - spent_s - RESERVE_S - RESERVE_FRACTION * budget_s
    epochs = 1
    while epochs < 100_000 and cost(epochs + 1, train_s, eval_s, cfg.eval_every) <= free:
        epochs += 1
    return Plan(budget_s=budget_s, epochs=epochs, planned_epochs=epochs,
                expected_s=round(spent_s + cost(epochs, train_s, eval_s, cfg.eval_every), 1),
                images_per_s=round(images_per_s, 1), epoch_s=round(train_s + eval_s / cfg.eval_every, 2),
                started_after_s=round(spent_s, 1))


def cost(epochs: int, train_s: float, eval_s: float, eval_every: int) -> float:
    evaluations = epochs // eval_every + (epochs % eval_every != 0)  # every eval_every epochs, and the last
    return epochs * train_s + evaluations * eval_s


def replan(plan: Plan, done: int, spent_s: float, epoch_seconds: list[float], evaluated: bool) -> int | None:
    """After `done` epochs and `spent_s` seconds: the shorter number of epochs that still fits at the pace
    measured (the slowest of the last two epochs), or None to keep the plan. The run may end at once
    only after an evaluated epoch (else one more: the last epoch is always evaluated)."""
    if done >= plan.epochs or not epoch_seconds:
        return None
    pace = max(epoch_seconds[-2:])
    free = plan.budget_s - spent_s - RESERVE_S
    fits = done + max(0, math.floor(free / pace))
    if fits >= plan.epochs:
        return None
    epochs = max(done if evaluated else done + 1, fits)
    plan.shortened.append(dict(after_epoch=done, epochs=epochs, pace_s=round(pace, 2)))
    plan.epochs = epochs
    return epochs


def saved(out: Path) -> Plan | None:
    path = out / "plan.json"
    return Plan(**json.loads(path.read_text())) if path.exists() else None


def save(out: Path, plan: Plan) -> None:
    from cifar_dist.rundir import write_atomic

    write_atomic(out / "plan.json", json.dumps(asdict(plan), indent=1) + "\n")


def process_age() -> float:
    """Seconds since this process started (Linux /proc), else 0: a budget counts the interpreter's and
    torch's start-up too, as the user's clock does."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Clock:
    """The budget's clock: this process's age when it was made (the start-up before training is set up),
    plus the time since; a resumed run adds the seconds it had already trained."""

    def __init__(self, started_before: float = 0.0):
        self.origin = time.monotonic() - started_before

    def __call__(self) -> float:
        return time.monotonic() - self.origin
