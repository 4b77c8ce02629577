"""Training to a deadline (--time-budget 10m): the steps that fit this machine, planned before the first
step from a measurement of this config's own training step, then moved to the pace the run measures as
it goes (fewer on a busy machine, more when the measurement was cautious). The recipe's schedule is laid
over the planned steps, anew at every change.

The plan is kept in the run directory (plan.json), so a resumed run keeps it and its deadline counts the
time already trained. The run always ends with an evaluated model and its checkpoint.
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

# Kept free of the plan (reserve()): the end of a run after its last evaluation (the final pictures,
# model.pt, summary.json), taken to cost what an evaluated epoch's end does (its pictures, a checkpoint),
# as measured; a second more; and a share of the budget for the pace's wobble, less once the run has
# measured its own pace. (A constant 3 s was a sixth of a 20 s budget left unused on a busy machine.)
RESERVE_S, RESERVE_FRACTION, LATE_RESERVE_FRACTION = 1.0, 0.03, 0.01
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
    """A budgeted run's plan and what became of it (plan.json, summary.json). Steps are its unit: an epoch of
    a fast preset is minutes on a CPU, too coarse to end near a deadline, so the last epoch may stop part-way
    (and is evaluated, as every run's last)."""
    budget_s: float
    steps: int  # optimizer steps planned now (after any change)
    planned_steps: int  # at the start
    steps_per_epoch: int
    expected_s: float  # of the whole run, as planned at the start
    images_per_s: float  # the training rate the plan used (whole world)
    step_s: float  # one training step, as planned
    eval_s: float  # an evaluated epoch's end (its evaluation, checkpoint, pictures), as planned
    started_after_s: float  # the run's own start-up before the plan (data, probes, the measurement)
    changes: list[dict[str, Any]] = field(default_factory=list)  # {after_step, steps, step_s}: moved to the pace
    auto: dict[str, Any] | None = None  # --preset auto's choice (cifar_dist.auto.record)

    @property
    def epochs(self) -> int:
        """The epochs the run trains, the last maybe in part."""
        return -(-self.steps // self.steps_per_epoch)

    def record(self) -> dict[str, Any]:
        """plan.json's and summary.json's fields, with the epochs they come to."""
        return dict(asdict(self), epochs=self.epochs, planned_epochs=self.in_epochs(self.planned_steps))

    def in_epochs(self, steps: int) -> float:
        return round(steps / self.steps_per_epoch, 2)

    def line(self) -> str:
        over = ("; not even one step and an evaluation fit: it will run past the budget (a smaller preset or a "
                "longer budget)" if self.expected_s > self.budget_s else "")
        text = (f"time budget {self.budget_s:.0f}s: {self.steps:,} steps planned ({self.in_epochs(self.steps):g} "
                f"epochs), expected {self.expected_s:.0f}s ({self.step_s:.3g}s a step at {self.images_per_s:,.0f} "
                f"training images/s measured now, {self.eval_s:.1f}s an evaluation, {self.started_after_s:.0f}s "
                f"of start-up){over}")
        if self.auto:
            text = f"{line(self.auto)}\n{text}"
        return text


def evaluations(done: int, total: int, steps_per_epoch: int, eval_every: int) -> int:
    """The evaluations still to come after `done` steps (inside the loop: the epoch of the step just taken
    has not ended) for a run of `total`: every eval_every epochs, and after the last."""
    ended = (done - 1) // steps_per_epoch if done else 0  # epochs whose end (and evaluation, if due) is past
    last = -(-total // steps_per_epoch)
    return max(0, last // eval_every - ended // eval_every) + (last % eval_every != 0 and last > ended)


def reserve(budget_s: float, eval_s: float, fraction: float) -> float:
    """Seconds kept free of the plan: the run's end (about an evaluated epoch's end), a second, a share."""
    return RESERVE_S + eval_s + fraction * budget_s


def cost(done: int, total: int, step_s: float, eval_s: float, steps_per_epoch: int, eval_every: int) -> float:
    """Seconds from step `done` to the end of a run of `total` steps: its training and evaluations."""
    return (total - done) * step_s + evaluations(done, total, steps_per_epoch, eval_every) * eval_s


def fit(free_s: float, done: int, step_s: float, eval_s: float, steps_per_epoch: int, eval_every: int) -> int:
    """The most steps in all (not fewer than `done`) whose training and evaluations from step `done` on fit
    in `free_s` seconds."""
    low, high = done, done + 100_000 * steps_per_epoch  # cost(low) may not fit: the run ends as soon as it can
    while low < high:
        mid = (low + high + 1) // 2
        fits = cost(done, mid, step_s, eval_s, steps_per_epoch, eval_every) <= free_s
        low, high = (mid, high) if fits else (low, mid - 1)
    return low


def plan_steps(cfg: Config, budget_s: float, spent_s: float, images_per_s: float, train_images: int,
               eval_images: int) -> Plan:
    """The most steps whose training, evaluations and final writes fit in what is left of the budget (at
    least one: a run always ends evaluated). `images_per_s` is the world's training rate."""
    per_epoch = train_images // cfg.batch_size
    step_s = cfg.batch_size / images_per_s
    eval_s = eval_images * tta_views(cfg.tta) * EVAL_COST / images_per_s
    free = budget_s - spent_s - reserve(budget_s, eval_s, RESERVE_FRACTION)
    steps = max(1, fit(free, 0, step_s, eval_s, per_epoch, cfg.eval_every))
    expected = cost(0, steps, step_s, eval_s, per_epoch, cfg.eval_every)
    return Plan(budget_s=budget_s, steps=steps, planned_steps=steps, steps_per_epoch=per_epoch,
                expected_s=round(spent_s + expected + reserve(budget_s, eval_s, 0.0), 1),
                images_per_s=round(images_per_s, 1), step_s=round(step_s, 4), eval_s=round(eval_s, 2),
                started_after_s=round(spent_s, 1))


def replan(plan: Plan, done: int, spent_s: float, step_s: float, eval_s: float, eval_every: int) -> str | None:
    """After `done` steps and `spent_s` seconds, at the pace measured: fewer steps when the plan no longer
    fits (down to ending now), more when it is well ahead; None to keep the plan, else the reason."""
    free = plan.budget_s - spent_s - reserve(plan.budget_s, eval_s, LATE_RESERVE_FRACTION)
    fits = fit(free, done, step_s, eval_s, plan.steps_per_epoch, eval_every)
    if fits < plan.steps:
        why = "behind"
    elif fits > plan.steps + max(1, plan.steps // 50) and done < plan.steps:  # not for a step or two
        why = "ahead of"
    else:
        return None
    plan.steps = fits
    plan.changes.append(dict(after_step=done, steps=plan.steps, step_s=round(step_s, 4)))
    return why


def end_estimate(plan: Plan, step_s: float, measured_s: float | None) -> float:
    """An evaluated epoch's end (and so the run's, which the reserve keeps): as the run measured it, else the
    plan's estimate slowed as much as the steps measured (the load that slows a step slows an evaluation too:
    a run's end took 2.6 s beside the test suite where the plan, made before the load, kept 1.3)."""
    return measured_s or plan.eval_s * max(1.0, step_s / plan.step_s)


def saved(out: Path) -> Plan | None:
    path = out / "plan.json"
    if not path.exists():
        return None
    fields = json.loads(path.read_text())
    try:
        return Plan(**{k: v for k, v in fields.items() if k not in ("epochs", "planned_epochs")})
    except TypeError:
        raise ConfigError(f"{path} is a plan of another version of cifar-dist; resume with that version, "
                          "or use another --output-dir") from None


def save(out: Path, plan: Plan) -> None:
    from cifar_dist.rundir import write_atomic

    write_atomic(out / "plan.json", json.dumps(plan.record(), indent=1) + "\n")


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
