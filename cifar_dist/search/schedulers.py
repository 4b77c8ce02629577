"""The trial schedulers of a search: ASHA stops weak trials early; PBT and PB2 keep every trial running
and, every perturbation interval, have the bottom quantile copy a top trial's checkpoint and settings,
then change the settings of the `mutate:` section (PBT: a neighbouring choice, a range times 0.8 or 1.2,
or a fresh sample; PB2: a value a Gaussian-process bandit picks within the range).

A copied checkpoint is resumed as any run of ours resumes (`rundir.resume`): the model, the optimiser
state and the position in the lr schedule come from the checkpoint, the mutated settings from the new
config. So a mutated lr rescales the schedule's peak and the run stays where it was on the schedule:
at step s it trains with new_lr * factor(s), where factor is the schedule's shape (warm-up, decay).
"""
from __future__ import annotations

import functools
from typing import Any

from cifar_dist.search.space import clip, mutations_for, range_bounds

SCHEDULERS = ("asha", "pbt", "pb2")
POPULATION = ("pbt", "pb2")  # the schedulers that copy and mutate trials
FACTORS = (0.8, 1.2)  # PBT: a range is multiplied by one of these...
RESAMPLE = 0.25  # ...or, with this probability, drawn afresh (a value of 0 moves only this way)


def make_scheduler(name: str, max_epochs: int, mutations: dict[str, Any], grace_period: int = 1,
                   reduction_factor: int = 2, interval: int = 2, quantile: float = 0.25) -> Any:
    """The Tune scheduler, on the trials' epochs. (Ranking, val_acc, is the TuneConfig's.)"""
    if name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace_period,
                             reduction_factor=reduction_factor)
    explore = functools.partial(clip, bounds=range_bounds(mutations))
    # synch: every trial waits at each perturbation for the others, and the quantiles compare them at the
    # same epoch. Asynchronous PBT compares a trial with the last scores of the rest, which on a cluster
    # smaller than the population (trials take turns) are from earlier epochs: a trial reaching epoch 4
    # beats every trial still at epoch 2, nobody is ever in the bottom quantile, and nothing is copied
    # (measured: 8 trials on 2 CPUs, 0 exploits in 6 epochs).
    # log_config off: the trials journal their exploits
    common: dict[str, Any] = dict(time_attr="epoch", perturbation_interval=interval, quantile_fraction=quantile,
                                  custom_explore_fn=explore, log_config=False, synch=True)
    if name == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        return type("PB2", (SyncAfterResume, PB2), {})(hyperparam_bounds=mutations_for(name, mutations), **common)
    from ray.tune.schedulers import PopulationBasedTraining

    return type("PopulationBasedTraining", (SyncAfterResume, PopulationBasedTraining), {})(
        hyperparam_mutations=mutations_for(name, mutations), perturbation_factors=FACTORS,
        resample_probability=RESAMPLE, **common)


class SyncAfterResume:
    """Synchronous PBT (and PB2) whose next synchronisation is always ahead of every trial. Ray moves it,
    at each one, to max(its previous value + the interval, the latest trial's epoch) and runs only trials
    behind it. A resumed search (`--resume`) has a new scheduler, whose previous value is the first
    interval whatever epoch the trials had reached: at the first synchronisation after the resume the
    next one became the trials' own epoch, no trial was behind it, and the search waited for ever
    (measured: trials paused at epoch 2 of 3, the driver saving its state in a loop). Here it is moved
    past the latest trial's epoch too, which in a search never resumed it already is."""

    _next_perturbation_sync: float
    _perturbation_interval: float
    _trial_state: dict[Any, Any]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        before = self._next_perturbation_sync
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        if self._next_perturbation_sync != before:  # a synchronisation happened
            latest = max(state.last_train_time for state in self._trial_state.values())
            self._next_perturbation_sync = max(self._next_perturbation_sync, latest + self._perturbation_interval)
        return decision


def checkpoints_to_keep(name: str, interval: int) -> int:
    """Tune's checkpoints kept per trial. PBT copies the checkpoint a top trial had at its last
    perturbation. Synchronous PBT pauses it there, so that is its newest; the interval and a spare are
    kept anyway, so that a copy never depends on the exact moment Tune prunes (Ray warns below 3)."""
    return interval + 2 if name in POPULATION else 1
