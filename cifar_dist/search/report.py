"""What a finished search leaves: results.csv and its table (one row per trial), history.csv (every
trial's reports), exploits.csv (PBT's copies), search.png, and best.yaml (the best trial's config, set up
to retrain on the full training set and measure the test set once) with, when PBT changed the best
trial's settings as it trained, best-replay.sh: that schedule as train.py commands."""
from __future__ import annotations

import csv
import math
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from cifar_dist import pictures
from cifar_dist.config import Config, ConfigError, save_yaml
from cifar_dist.model import build_model, count_params
from cifar_dist.search.space import SearchError, trial_config
from cifar_dist.search.trial import JOURNAL, read_events
from cifar_dist.settings import with_role
from cifar_dist.tables import text_table

Journals = dict[str, list[dict[str, Any]]]  # trial id -> its events (trial.py)
Segment = tuple[int, dict[str, Any]]  # (first epoch trained with these settings, the settings)
EXPLOIT_COLUMNS = ("trial", "epoch", "donor", "donor_epoch")  # then <setting>_before/_donor/_after


def trial_rows(grid: Any, max_epochs: int, base: dict[str, Any], population: bool = False) -> list[dict[str, Any]]:
    """One row per trial, best first: status, last and best validation accuracy, size, (PBT: exploits,
    its settings are its last ones), settings."""
    best = grid.get_dataframe(filter_metric="val_acc", filter_mode="max")  # each trial's best epoch
    best_acc = dict(zip(best["trial_id"], best["val_acc"])) if "val_acc" in best else {}
    rows = []
    for r in grid:
        m, params = r.metrics or {}, dict(sorted(r.config.items()))
        trial = trial_id(r)
        epochs = int(m.get("epoch", 0))
        planned = int(m.get("planned_epochs", max_epochs))  # a trial's own plan under --trial-budget
        cfg = config_of(params, base)
        status = trial_status(bool(r.error), epochs, planned, m.get("val_loss"), cfg.model.num_classes if cfg else 10)
        rows.append(dict(trial=trial, status=status, val_acc=m.get("val_acc"), best_val_acc=best_acc.get(trial),
                         epochs=epochs, params=count_params(build_model(cfg.model)) if cfg else None,
                         **({"exploits": int(m.get("exploits", 0))} if population else {}),
                         **{k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in params.items()},
                         error=(str(r.error).strip().splitlines() or [""])[-1][:200] if r.error else ""))
    return sorted(rows, key=lambda row: (row["status"] == "failed", row["val_acc"] is None, -(row["val_acc"] or 0)))


# A trial whose validation loss ends this many times a uniform guess's (ln of the classes) answers confidently
# wrong: its weights blew up (a learning rate too high), though no loss became NaN
DIVERGED_FACTOR = 10


def trial_status(failed: bool, epochs: int, planned: int, val_loss: float | None, classes: int) -> str:
    """failed (it raised), diverged (see DIVERGED_FACTOR), completed, or stopped early (by the scheduler)."""
    if failed:
        return "failed"
    if val_loss is not None and not val_loss <= DIVERGED_FACTOR * math.log(classes):  # (NaN too)
        return f"diverged (val loss {val_loss:,.0f})"
    return "completed" if epochs >= planned else "stopped early"


def trial_id(result: Any) -> str:
    """A trial's id, from its Tune directory (run_trial_<id>_<index>_<tag>_<date>): its last metrics may be
    a donor's (PBT hands a trial the result of the checkpoint it copies)."""
    found = re.match(r"run_trial_([0-9a-f]+_\d{5})_", Path(result.path or "").name)
    return found.group(1) if found else str((result.metrics or {}).get("trial_id", Path(result.path or "?").name))


def config_of(params: dict[str, Any], base: dict[str, Any]) -> Config | None:
    """A trial's Config, or None where its settings no longer make one."""
    try:
        return trial_config(params, base)
    except (ConfigError, SearchError):
        return None


def write_csv(rows: list[dict[str, Any]], path: Path, first: tuple[str, ...] = ()) -> list[str]:
    """Every row's columns, `first` first (written even without rows)."""
    keys = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return keys


def write_table(rows: list[dict[str, Any]], path: Path) -> str:
    """results.csv (every column), and the table to print (without the error text)."""
    keys = write_csv(rows, path)
    return text_table(rows, [k for k in keys if k != "error"])


def write_record(search_dir: Path, rows: list[dict[str, Any]], events: Journals, best: str | None,
                 population: bool) -> dict[str, np.ndarray]:
    """history.csv, exploits.csv (PBT), and search.png, which it returns for the trackers."""
    write_csv(history_rows(events), search_dir / "history.csv")
    if population:
        write_csv(exploit_rows(events), search_dir / "exploits.csv", EXPLOIT_COLUMNS)
    sizes = {row["trial"]: (row["params"], row["val_acc"], row["status"]) for row in rows}
    picture = pictures.search_figure(reports(events), sizes, best)
    pictures.save_png(picture, search_dir / "search.png")
    return {"search": picture}


# --- the trials' journals: history, exploits, the best trial's schedule ------------------------------

def journals(search_dir: Path) -> Journals:
    trials = (p.with_name(p.name.removesuffix(JOURNAL)) for p in sorted((search_dir / "trials").glob(f"*{JOURNAL}")))
    return {trial.name: read_events(trial) for trial in trials}


def reports(events: Journals) -> dict[str, list[dict[str, Any]]]:
    return {trial: [e for e in es if e["event"] == "report"] for trial, es in events.items()}


def history_rows(events: Journals) -> list[dict[str, Any]]:
    """history.csv: every report of every trial, in the order each trial made them."""
    keep = ("exploits", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
    return [dict(trial=trial, **{k: r.get(k) for k in keep}) for trial, rs in reports(events).items() for r in rs]


def exploit_rows(events: Journals) -> list[dict[str, Any]]:
    """exploits.csv: which trial copied which, at which of its epochs, from which of the donor's; and each
    setting that changed, as the trial had it, as the donor had it, and after the perturbation."""
    found = [(trial, e) for trial, es in events.items() for e in es if e["event"] == "exploit"]
    changed = sorted({k for _, e in found for k in e["after"]
                      if len({repr(e["before"].get(k)), repr(e["donor_params"].get(k)), repr(e["after"][k])}) > 1})
    return [dict(zip(EXPLOIT_COLUMNS, (trial, e["epoch"], e["donor"], e["donor_epoch"])),
                 **{f"{k}_{which}": e[field].get(k) for k in changed
                    for which, field in (("before", "before"), ("donor", "donor_params"), ("after", "after"))})
            for trial, e in found]


def schedule(events: Journals, trial: str, life: int | None = None) -> list[Segment]:
    """The settings a trial's weights were trained with, epoch by epoch: its first settings, or (after
    exploit k) the donor's schedule up to the copied epoch and then the perturbed settings. Consecutive
    equal settings merge into one segment."""
    exploits = [e for e in events[trial] if e["event"] == "exploit"]
    life = len(exploits) if life is None else life
    if life == 0:
        return [(0, next(e["params"] for e in events[trial] if e["event"] == "start"))]
    x = exploits[life - 1]
    before = [seg for seg in schedule(events, x["donor"], x["donor_exploits"]) if seg[0] < x["donor_epoch"]]
    return before + ([(x["donor_epoch"], x["after"])] if x["after"] != before[-1][1] else [])


def retrain_config(cfg: Config) -> Config:
    """A trial's config as a run of its own: on the full training set, evaluated on the test set, and
    with the settings that name and record one run (role "record") back at their defaults."""
    defaults = Config()
    for name in with_role(Config, "record"):
        setattr(cfg, name, getattr(defaults, name))
    cfg.cpu_threads = defaults.cpu_threads  # a trial's was its share of Ray's CPUs
    cfg.val_size, cfg.eval_test = 0, True
    return cfg


def write_best(grid: Any, base: dict[str, Any], search_dir: Path,
               events: Journals) -> tuple[Path, str, float, list[list[str]]] | None:
    """best.yaml (the best trial's first settings); for a schedule of several settings, best-replay.sh
    too. Returns its path, the best trial's id (a resumed search may crown another trial), its validation
    accuracy, and the train.py arguments that replay it (one command per segment)."""
    # Not grid.get_best_result: it ranks a trial that reported and then crashed too.
    ok = [r for r in grid if not r.error and (r.metrics or {}).get("val_acc") is not None]
    if not ok:
        return None
    best = max(ok, key=lambda r: r.metrics["val_acc"])
    trial = trial_id(best)
    segments = schedule(events, trial) if trial in events else [(0, dict(best.config))]
    path = search_dir / "best.yaml"
    save_yaml(retrain_config(trial_config(segments[0][1], base)), path)
    commands = replay_commands(segments, path)
    (search_dir / "best-replay.sh").unlink(missing_ok=True)
    if len(commands) > 1:
        write_replay(commands, search_dir / "best-replay.sh", trial)
    return path, trial, best.metrics["val_acc"], commands


def replay_commands(segments: list[Segment], best: Path) -> list[list[str]]:
    """train.py arguments for each segment: best.yaml with the segment's changed settings, stopping
    where the next segment starts; each command resumes the one before's checkpoint."""
    first = segments[0][1]
    commands = []
    for i, (_, params) in enumerate(segments):
        args = ["--config", str(best)]
        for key, value in params.items():
            flag = f"--{key.replace('_', '-')}"
            if value != first.get(key):
                args += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
        if i + 1 < len(segments):
            args += ["--stop-after", str(segments[i + 1][0])]
        commands.append(args)
    return commands


def write_replay(commands: list[list[str]], path: Path, trial: str) -> None:
    lines = ["#!/usr/bin/env bash",
             f"# The best trial ({trial}) was trained with settings PBT changed on the way: best.yaml holds the",
             "# first; each command trains until the next change and the next one resumes from its checkpoint",
             "# with the new settings (as the trial did). Usage: bash best-replay.sh [OUTPUT_DIR] [train.py flags]",
             "set -euo pipefail", 'out=${1:-runs/best-replay}; shift || true']
    lines += [f'python -m cifar_dist.train {shlex.join(args)} --output-dir "$out" "$@"' for args in commands]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
