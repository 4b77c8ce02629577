"""What a finished search leaves: results.csv and its table (one row per trial), best.yaml (the best
trial's config, set up to retrain on the full training set and measure the test set once)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from cifar_dist.config import Config, ConfigError, save_yaml
from cifar_dist.model import build_model, count_params
from cifar_dist.search.space import SearchError, trial_config
from cifar_dist.settings import with_role
from cifar_dist.tables import text_table


def trial_rows(grid: Any, max_epochs: int, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial, best first: status, last and best validation accuracy, size, parameters."""
    best = grid.get_dataframe(filter_metric="val_acc", filter_mode="max")  # each trial's best epoch
    best_acc = dict(zip(best["trial_id"], best["val_acc"])) if "val_acc" in best else {}
    rows = []
    for r in grid:
        m, params = r.metrics or {}, dict(sorted(r.config.items()))
        trial = m.get("trial_id") or Path(r.path or "?").name
        epochs = int(m.get("epoch", 0))
        status = "failed" if r.error else ("completed" if epochs >= max_epochs else "stopped early")
        rows.append(dict(trial=trial, status=status, val_acc=m.get("val_acc"), best_val_acc=best_acc.get(trial),
                         epochs=epochs, params=parameters(params, base),
                         **{k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in params.items()},
                         error=(str(r.error).strip().splitlines() or [""])[-1][:200] if r.error else ""))
    return sorted(rows, key=lambda row: (row["status"] == "failed", row["val_acc"] is None, -(row["val_acc"] or 0)))


def parameters(params: dict[str, Any], base: dict[str, Any]) -> int | None:
    try:
        return count_params(build_model(trial_config(params, base).model))
    except (ConfigError, SearchError):
        return None


def write_table(rows: list[dict[str, Any]], path: Path) -> str:
    """results.csv (every column), and the table to print (without the error text)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return text_table(rows, [k for k in keys if k != "error"])


def retrain_config(cfg: Config) -> Config:
    """A trial's config as a run of its own: on the full training set, evaluated on the test set, and
    with the settings that name and record one run (role "record") back at their defaults."""
    defaults = Config()
    for name in with_role(Config, "record"):
        setattr(cfg, name, getattr(defaults, name))
    cfg.cpu_threads = defaults.cpu_threads  # a trial's was its share of Ray's CPUs
    cfg.val_size, cfg.eval_test = 0, True
    return cfg


def write_best(grid: Any, base: dict[str, Any], search_dir: Path) -> tuple[Path, str, float] | None:
    """best.yaml; the best trial's id (a resumed search may crown another trial) and validation accuracy."""
    # Not grid.get_best_result: it ranks a trial that reported and then crashed too.
    ok = [r for r in grid if not r.error and (r.metrics or {}).get("val_acc") is not None]
    if not ok:
        return None
    best = max(ok, key=lambda r: r.metrics["val_acc"])
    path = search_dir / "best.yaml"
    save_yaml(retrain_config(trial_config(dict(best.config), base)), path)
    return path, str(best.metrics.get("trial_id") or Path(best.path or "best").name), best.metrics["val_acc"]
