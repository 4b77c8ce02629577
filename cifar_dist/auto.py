"""--preset auto (with --time-budget): of the trainings in cifar_dist.recipes.AUTO, the one expected to be most
accurate within the budget on this machine.

Each is measured here, as a budget measures a run (its own training step, in the precision and micro-batch
it would train in), the epochs that fit the budget are planned for it, and its accuracy at that many epochs
is read off the table of what it reached on real CIFAR-10 (auto_table.json, written by `python -m
bench.auto`, with the machine it was measured on). The speed is this machine's; the accuracy is the
table's, for CIFAR-10: on other data it ranks the trainings, it does not promise a figure. Where no
training fits a step, the quickest is chosen (and the plan line says it will run past the budget).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cifar_dist.config import Config, ConfigError, resolve
from cifar_dist.recipes import AUTO

TABLE = Path(__file__).with_name("auto_table.json")


@dataclass
class Option:
    """One training of the table, planned for this budget on this machine."""
    name: str
    epochs: float  # a budget's last epoch may be a part of one
    expected_s: float
    images_per_s: float
    expected_acc: float | None  # None: the table has no row of it
    fits: bool


def candidate_argv(name: str, argv: list[str]) -> list[str]:
    """The command line of a candidate: its flags, then the user's (which win), then its preset again (over
    the user's `--preset auto`: the last one given counts)."""
    flags = AUTO[name]
    return [*flags, *argv, "--preset", flags[flags.index("--preset") + 1]]


def expected_accuracy(rows: list[dict[str, Any]], name: str, epochs: float) -> float | None:
    """The table's accuracy of `name` at `epochs`: interpolated between the epochs measured, no more than the
    most-trained row's beyond them, scaled down linearly below the fewest."""
    points = sorted((r["epochs"], r["test_acc"]) for r in rows if r["candidate"] == name)
    if not points:
        return None
    if epochs <= points[0][0]:
        return points[0][1] * epochs / points[0][0]
    for (e0, a0), (e1, a1) in zip(points, points[1:]):
        if epochs <= e1:
            return a0 + (a1 - a0) * (epochs - e0) / (e1 - e0)
    return points[-1][1]


def decide(options: list[Option]) -> Option:
    """The most accurate option that fits the budget; if none fits, the quickest."""
    fitting = [o for o in options if o.fits and o.expected_acc is not None]
    if fitting:
        return max(fitting, key=lambda o: (o.expected_acc, -o.expected_s))
    return min(options, key=lambda o: o.expected_s)


def load_table() -> dict[str, Any]:
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--preset auto needs its table {TABLE} ({e}): python -m bench.auto writes it") from None


def record(chosen: Option, options: list[Option], table: dict[str, Any]) -> dict[str, Any]:
    """What plan.json and summary.json keep of the choice (the run's plan takes the chosen one's rate)."""
    return dict(chosen=chosen.name, options=[asdict(o) for o in options], table_machine=table.get("machine", ""))


def chosen_option(auto: dict[str, Any]) -> dict[str, Any]:
    """The chosen option of a record (as plan.json keeps it)."""
    return next(o for o in auto["options"] if o["name"] == auto["chosen"])


def line(auto: dict[str, Any]) -> str:
    """`preset auto: fast, 5 epochs, 92.9 % expected (quick: 2 epochs, 84.1 %)`, for the plan's line."""
    def words(o: dict[str, Any]) -> str:
        acc = f"{o['expected_acc']:.1%}" if o["expected_acc"] is not None else "no table row"
        epochs = f"{o['epochs']:g} epoch{'s' if o['epochs'] != 1 else ''}"
        return f"{o['name']}, {epochs}, {acc}{'' if o['fits'] else ', does not fit'}"

    chosen = chosen_option(auto)
    others = "; ".join(words(o) for o in auto["options"] if o["name"] != auto["chosen"])
    return f"preset auto: {words(chosen)} expected on CIFAR-10" + (f" (not {others})" if others else "")


def candidates(argv: list[str]) -> dict[str, Config]:
    return {name: resolve(candidate_argv(name, argv)) for name in AUTO}


def kept_choice(cfg: Config) -> dict[str, Any] | None:
    """The choice a run in this output directory already made (its plan.json), kept on resume."""
    path = Path(cfg.output_dir) / "plan.json" if cfg.output_dir else None
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text()).get("auto")


def choose(argv: list[str], clock: Any) -> tuple[Config, dict[str, Any]]:
    """The chosen training's Config and the record of the choice (a run in the output directory keeps its
    own). Every process of a launch agrees: the main process measures and decides, the others take its
    answer. `clock()`: the seconds this run's budget has used so far."""
    from accelerate.utils import broadcast_object_list

    from cifar_dist.distributed import deepspeed_asked, machine_choices, micro_batch, process_group

    configs = candidates(argv)
    first = next(iter(configs.values()))
    if (kept := kept_choice(first)) is not None:
        return configs[kept["chosen"]], kept
    deepspeed = deepspeed_asked(None)
    state = process_group(deepspeed)[0]
    choices = {}
    for name, cfg in configs.items():  # every rank: the precision and micro-batch probes are collective
        choices[name] = machine_choices(cfg, state)
        choices[name].update(micro_batch(cfg, state, choices[name]["mixed_precision"], deepspeed))
    answer = [plan_options(configs, choices, state, clock) if state.is_main_process else None]
    decided = broadcast_object_list(answer)[0]
    if isinstance(decided, str):  # every rank stops with the main process's line
        raise ConfigError(decided)
    return configs[decided["chosen"]], decided


def plan_options(configs: dict[str, Config], choices: dict[str, dict[str, Any]], state: Any,
                 clock: Any) -> dict[str, Any] | str:
    """On the main process: each candidate's speed here, its epochs in the budget and their expected
    accuracy; the choice's record, or the line saying why there is none."""
    from cifar_dist import budget, machine
    from cifar_dist.data import DataError, load_data
    from cifar_dist.optim import make_optimizer

    first = next(iter(configs.values()))
    try:
        table = load_table()
        budget_s = budget.budget_seconds(first.time_budget, clock())
        data = load_data(first)
    except (ConfigError, DataError) as e:
        return str(e)
    train_images = len(data.train)
    eval_images = (len(data.val) if data.val is not None else 0) + (len(data.test) if first.eval_test else 0)
    rates = {}
    for name, cfg in configs.items():
        micro, bf16 = choices[name]["micro_batch"], choices[name]["mixed_precision"] == "bf16"
        speed = machine.measure_micro(cfg, [micro], bf16, state.device, functools.partial(make_optimizer, cfg),
                                      seconds=min(2.0, budget_s / 50))
        rates[name] = speed[micro] * state.num_processes
    spent, options = clock(), []  # every option planned from the same moment: after all the measuring
    for name, cfg in configs.items():
        plan = budget.plan_steps(cfg, budget_s, spent, rates[name], train_images, eval_images)
        epochs = plan.in_epochs(plan.steps)
        options.append(Option(name, epochs, plan.expected_s, round(rates[name], 1),
                              expected_accuracy(table["rows"], name, epochs), plan.expected_s <= budget_s))
    return dict(record(decide(options), options, table), budget_s=budget_s)
