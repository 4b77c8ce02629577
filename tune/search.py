"""Ray Tune search over ResNet shape and training settings: `python tune/search.py ...` (see README).

Every trial calls the same `cifar_dist.train.train` as `accelerate launch cifar_dist/train.py`, ranks on
a validation split carved out of the training set (never the test set), reports each epoch (metrics and
checkpoint) to Tune so ASHA can stop weak trials early and a failed trial resumes from its checkpoint.
The best configuration is written as `best.yaml`, which train.py trains directly.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any


from cifar_dist.config import MODEL_FIELDS, TOP_FIELDS, Config, ConfigError, load_yaml, resolve, save_yaml
from cifar_dist.data import SYNTHETIC_SIZES, data_root
from cifar_dist.model import build_model, count_params
from launcher.launch import BACKENDS, deepspeed_env

PROG = "tune/search.py"
SPACE = Path(__file__).with_name("space.yaml")
ARCH_KEYS = ("stages", "blocks_per_stage", "base_width")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchError(ValueError):
    """Bad input to the search; one line that names the problem."""


# --- the search space ------------------------------------------------------------------------------

def load_space(path: Path) -> dict[str, Any]:
    try:
        return load_yaml(path)
    except ConfigError as e:
        raise SearchError(f"search space: {e}") from None


def candidates(key: str, spec: Any) -> list[Any]:
    """The values a spec can take that are worth checking (all choices, or the bounds)."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SearchError(f"search space: {key} must be a value or one of {{{', '.join(KINDS)}: ...}}, got {spec}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SearchError(f"search space: {key} {kind} is empty")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
            raise SearchError(f"search space: {key} {kind} needs [low, high], got {values}")
        lo, hi = values
        if not lo < hi:
            raise SearchError(f"search space: {key} {kind} bounds are reversed or equal: [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise SearchError(f"search space: {key} loguniform needs positive bounds, got [{lo}, {hi}]")
        if kind != "randint" and integer(key):
            raise SearchError(f"search space: {key} takes whole numbers; use randint (high end excluded), not {kind}")
        return [lo, hi - 1] if kind == "randint" else [lo, hi]
    return values


def integer(key: str) -> bool:
    """Whether a setting takes whole numbers (a uniform sample would fail inside the trial)."""
    return key in ARCH_KEYS or (TOP_FIELDS.get(key) or MODEL_FIELDS.get(key) or (None,))[0] is int


def overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled parameters -> Config overrides (the three architecture keys build widths/blocks/strides)."""
    out = {k: v for k, v in params.items() if k not in ARCH_KEYS}
    if any(k in params for k in ARCH_KEYS):
        try:
            stages, blocks, width = (int(params.get("stages", 3)), int(params.get("blocks_per_stage", 1)),
                                     int(params.get("base_width", 32)))
        except (TypeError, ValueError):
            raise SearchError(f"search space: stages, blocks_per_stage and base_width must be integers, "
                              f"got {params}") from None
        for name, value in (("stages", stages), ("blocks_per_stage", blocks), ("base_width", width)):
            if value <= 0:
                raise SearchError(f"search space: {name} must be positive, got {value}")
        out.update(stem_width=width, widths=[width * 2**i for i in range(stages)], blocks=[blocks] * stages,
                   strides=[1] + [2] * (stages - 1))
    return out


def check_space(space: dict[str, Any], base: dict[str, Any]) -> None:
    """Every key known and every candidate value a valid Config, before Ray starts anything."""
    for key in space:
        if key not in ARCH_KEYS and key not in TOP_FIELDS and key not in MODEL_FIELDS:
            raise SearchError(f"search space: unknown setting {key!r}")
    explicit = sorted({"stem_width", "widths", "blocks", "strides"} & space.keys())
    if explicit and any(k in space for k in ARCH_KEYS):
        raise SearchError(f"search space: {', '.join(explicit)} conflict with {', '.join(ARCH_KEYS)}; use one form")
    firsts = {key: candidates(key, spec)[0] for key, spec in space.items()}
    for key, spec in space.items():  # each value of each key, with the first value of every other key
        for value in candidates(key, spec):
            try:
                resolve([], {**base, **overrides({**firsts, key: value})})
            except ConfigError as e:
                raise SearchError(f"search space: {key}={value!r}: {e}") from None


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    made = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            made[key] = spec
            continue
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            made[key] = tune.choice(values) if kind == "choice" else tune.grid_search(values)
        else:
            made[key] = getattr(tune, kind)(*values)
    return made


# --- a trial ---------------------------------------------------------------------------------------

def trial_config(params: dict[str, Any], base: dict[str, Any], trial_dir: Path | None = None) -> Config:
    extra = {"output_dir": str(trial_dir)} if trial_dir else {}
    return resolve([], {**base, **overrides(params), **extra})


def run_trial(params: dict[str, Any], base: dict[str, Any], search_dir: str, workers: int, use_gpu: bool,
              per_worker: dict[str, float], env: dict[str, str]) -> None:
    """The Tune trainable: the training function of train.py, reporting each epoch to Tune."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(search_dir) / "trials" / trial_id
    trial_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(trial_dir.with_suffix(".starts"), "a") as f:  # how often this trial was (re)started
        f.write(f"{time.time()}\n")
    if checkpoint := tune.get_checkpoint():  # restored by Tune: put its epoch checkpoint back in place
        with checkpoint.as_directory() as d:
            for epoch_dir in Path(d).glob("epoch-*"):
                target = trial_dir / "checkpoints" / epoch_dir.name
                if not target.exists():
                    shutil.copytree(epoch_dir, target)
    overrides_ = {**base, "run_name": trial_id}
    if workers == 1 and not env:
        _train_and_report(dict(params=params, base=overrides_, trial_dir=str(trial_dir)))
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # DeepSpeed needs a process group even for one worker: those trials always go through Ray Train.
    TorchTrainer(_train_and_report, train_loop_config=dict(params=params, base=overrides_, trial_dir=str(trial_dir),
                                                           env=env),
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                              resources_per_worker=per_worker),
                 run_config=RunConfig(name=trial_id, storage_path=str(Path(search_dir) / "ray_train"),
                                      callbacks=[TuneReportCallback()])).fit()


def _train_and_report(config: dict[str, Any]) -> None:
    """Runs in the trial process, or in each worker of a DDP trial (Ray Train sets up the process group)."""
    import ray
    from ray import tune

    from cifar_dist.train import train

    os.environ.update(config.get("env", {}))  # DeepSpeed: what accelerate launch would have set
    cfg = trial_config(config["params"], config["base"], Path(config["trial_dir"]))
    in_ray_train = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    params = count_params(build_model(cfg.model))

    last: list[tuple[dict[str, Any], Path]] = []

    def report(metrics: dict[str, Any], checkpoint_dir: Path, final: bool = False) -> None:
        if metrics["epoch"] == cfg.epochs and not final:  # Tune ends a trial at its last report: let train() finish
            last.append((metrics, checkpoint_dir))
            return
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"params": params}
        rank0 = int(os.environ.get("RANK", "0")) == 0
        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir.parent)) if rank0 else None
        (ray.train.report if in_ray_train else tune.report)(result, checkpoint=ckpt)

    train(cfg, on_epoch=report)
    for metrics, checkpoint_dir in last:  # now that summary.json and model.pt are written
        report(metrics, checkpoint_dir, final=True)


# --- the search ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--space", type=Path, default=SPACE, help="search space YAML (default: tune/space.yaml)")
    a("--num-samples", type=int, default=8, help="configurations to sample (x each grid point)")
    a("--max-epochs", type=int, default=10, help="epochs of a trial that is never stopped")
    a("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    a("--reduction-factor", type=int, default=2, help="ASHA: keep the best 1/N at each rung")
    a("--dataset", default="cifar10", help="cifar10 or synthetic")
    a("--data-dir", default="", help="CIFAR-10 folder (default $CIFAR10_DIR, then ./data)")
    a("--train-subset", type=int, default=0, help="train on the first N images (0: all)")
    a("--test-subset", type=int, default=0, help="test images for --retrain-best (0: all)")
    a("--val-size", type=int, default=5000, help="validation images held out of the training set (ranking)")
    a("--cpus-per-trial", type=float, default=1, help="CPUs per trial (per worker with --workers-per-trial)")
    a("--gpus-per-trial", type=float, default=0, help="GPUs per trial; fractions share a GPU (0.5: two trials)")
    a("--workers-per-trial", type=int, default=1, help="each trial an N-process DDP job (Ray Train)")
    a("--backend", default="ddp", choices=sorted(BACKENDS), help="distribution of a trial: ddp or a DeepSpeed "
      "ZeRO config of the launcher (always Ray Train workers)")
    a("--max-concurrent", type=int, default=0, help="trials at once (0: as many as the resources allow)")
    a("--mixed-precision", default="", help="no, bf16 or fp16 for every trial")
    a("--tracker", default="none", help="tracker of every trial (wandb: one run per trial, grouped by search)")
    a("--seed", type=int, default=0, help="seed of the search and of every trial (fixes the validation split)")
    a("--output-dir", type=Path, default=None, help="search directory (default runs/search-<timestamp>)")
    a("--address", default=os.environ.get("RAY_ADDRESS", ""), help="join this Ray cluster (default $RAY_ADDRESS)")
    a("--resume", action="store_true", help="continue the interrupted search in --output-dir")
    a("--max-failures", type=int, default=1, help="retries of a trial that raises")
    a("--retrain-best", action="store_true", help="train best.yaml on the full training set; report test accuracy")
    a("--verbose", action="store_true", help="show the trials' own output")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_samples", "max_epochs", "grace_period", "workers_per_trial", "max_failures"):
        if getattr(args, name) < (0 if name == "max_failures" else 1):
            raise SearchError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.reduction_factor < 2:
        raise SearchError(f"--reduction-factor must be >= 2, got {args.reduction_factor}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise SearchError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if args.val_size <= 0:
        raise SearchError("--val-size must be positive: trials are ranked on the validation split")
    n_train = SYNTHETIC_SIZES[0] if args.dataset == "synthetic" else 50_000
    if args.val_size >= n_train:
        raise SearchError(f"--val-size {args.val_size} leaves no training images: the {args.dataset} training set "
                          f"has {n_train}")
    if args.grace_period > args.max_epochs:
        raise SearchError(f"--grace-period {args.grace_period} exceeds --max-epochs {args.max_epochs}")


def base_overrides(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """What every trial shares: data, budget, and honest evaluation (validation only). Paths are made
    absolute: Ray runs each trial in a working directory of its own."""
    data_dir = str(data_root(args.data_dir).resolve()) if args.dataset == "cifar10" else args.data_dir
    return dict(dataset=args.dataset, data_dir=data_dir, train_subset=args.train_subset, val_size=args.val_size,
                eval_test=False, eval_every=1, epochs=args.max_epochs, seed=args.seed, keep_checkpoints=1,
                mixed_precision=args.mixed_precision, tracker=args.tracker, group=name)


def check_address(address: str) -> None:
    """Fail in seconds, with one line, instead of waiting on a cluster that is not there."""
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or hostport, int(port) if port.isdigit() else 6379), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot reach the Ray cluster at {address} ({e.__class__.__name__}: {e})") from None


def start_ray(args: argparse.Namespace) -> None:
    import ray

    check_address(args.address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=args.verbose, configure_logging=True,
                  logging_level="ERROR")
    ray.init(address=args.address or None, **kwargs)
    have = ray.cluster_resources()
    need_gpu = args.gpus_per_trial * args.workers_per_trial
    need_cpu = args.cpus_per_trial * args.workers_per_trial + (0.1 if args.workers_per_trial > 1 else 0)
    if need_gpu > have.get("GPU", 0):
        raise SearchError(f"a trial needs {need_gpu:g} GPUs but the Ray cluster has {have.get('GPU', 0):g}")
    if need_cpu > have.get("CPU", 0):
        raise SearchError(f"a trial needs {need_cpu:g} CPUs but the Ray cluster has {have.get('CPU', 0):g}")


def make_tuner(args: argparse.Namespace, space: dict[str, Any], search_dir: Path, name: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = base_overrides(args, name)
    workers, use_gpu = args.workers_per_trial, args.gpus_per_trial > 0
    per_worker = {"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial}
    env = deepspeed_env(args.backend)
    trainable = tune.with_parameters(run_trial, base=base, search_dir=str(search_dir), workers=workers,
                                     use_gpu=use_gpu, per_worker=per_worker, env=env)
    # A Ray Train trial's function only waits on its workers, which ask for the real resources.
    ray_train = workers > 1 or bool(env)
    resources = {"cpu": 0.1} if ray_train else {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    trainable = tune.with_resources(trainable, resources)
    if ray_train and not args.max_concurrent:  # else trial functions take the CPUs their workers need
        import ray

        have = ray.cluster_resources()
        fits = [have.get(k, 0) // (v * workers) for k, v in per_worker.items() if v]
        args.max_concurrent = max(1, int(min(fits)))
    run_config = tune.RunConfig(name=name, storage_path=str(search_dir.parent.resolve()),
                                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0)
    if args.resume:
        return tune.Tuner.restore(str(search_dir.resolve()), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=args.max_epochs, grace_period=args.grace_period,
                              reduction_factor=args.reduction_factor)
    tune_config = tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler, num_samples=args.num_samples,
                                  max_concurrent_trials=args.max_concurrent or None, reuse_actors=False)
    return tune.Tuner(trainable, param_space=to_tune(space), tune_config=tune_config, run_config=run_config)


def collect(results, args: argparse.Namespace, base: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m = r.metrics or {}
        params = {k: r.config[k] for k in sorted(r.config)}
        try:
            n = count_params(build_model(trial_config(params, base).model))
        except (ConfigError, SearchError):
            n = None
        epochs = int(m.get("epoch", 0))
        status = "failed" if r.error else ("completed" if epochs >= args.max_epochs else "stopped early")
        best = None
        df = r.metrics_dataframe
        if df is not None and "val_acc" in df:
            best = float(df["val_acc"].max())
        rows.append(dict(trial=m.get("trial_id") or Path(r.path or "?").name, status=status,
                         val_acc=m.get("val_acc"), best_val_acc=best, epochs=epochs, params=n,
                         **{k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in params.items()},
                         error=(str(r.error).strip().splitlines() or [""])[-1][:200] if r.error else ""))
    return sorted(rows, key=lambda row: (row["val_acc"] is None, -(row["val_acc"] or 0)))


def write_table(rows: list[dict[str, Any]], path: Path) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    shown = [k for k in keys if k != "error"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    cells = [[fmt(row.get(k)) for k in shown] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(shown)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(shown, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_best(results, base: dict[str, Any], search_dir: Path) -> tuple[Path, str] | None:
    """best.yaml, and the best trial's id (a resumed search may crown another trial)."""
    ok = [r for r in results if not r.error and (r.metrics or {}).get("val_acc") is not None]
    if not ok:
        return None
    best = max(ok, key=lambda r: r.metrics["val_acc"])
    cfg = trial_config(dict(best.config), base)
    # Retrain on the full training set and measure the test set, once.
    for key, value in dict(val_size=0, eval_test=True, output_dir="", run_name="", group="", tracker="none",
                           keep_checkpoints=2).items():
        setattr(cfg, key, value)
    path = search_dir / "best.yaml"
    save_yaml(cfg, path)
    return path, str(best.metrics.get("trial_id") or Path(best.path or "best").name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        search_dir = (args.output_dir or Path(f"runs/search-{datetime.now():%Y%m%d-%H%M%S}")).resolve()
        name = search_dir.name
        if args.resume and not (search_dir / "tuner.pkl").exists():
            raise SearchError(f"nothing to resume in {search_dir} (no tuner.pkl)")
        if not args.resume and search_dir.exists() and any(search_dir.iterdir()):
            raise SearchError(f"{search_dir} already holds a search; use --resume or another --output-dir")
        space = load_space(args.space)
        base = base_overrides(args, name)
        check_space(space, base)
        start_ray(args)
    except SearchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    search_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.space, search_dir / "space.yaml") if not args.resume else None
    print(f"search {name}: {args.num_samples} samples x {args.max_epochs} epochs, ASHA grace {args.grace_period}; "
          f"ranking on {args.val_size} validation images; results in {search_dir}", flush=True)
    tuner = make_tuner(args, space, search_dir, name)
    results = tuner.fit()
    rows = collect(results, args, base)
    print(write_table(rows, search_dir / "results.csv"))
    found = write_best(results, base, search_dir)
    if found is None:
        print(f"{PROG}: error: no trial finished an epoch; see {search_dir}/trials", file=sys.stderr)
        return 1
    best, trial = found
    print(f"best: {best} (val acc {rows[0]['val_acc']:.2%}); train it with "
          f"`accelerate launch cifar_dist/train.py --config {best}`")
    if args.retrain_best:
        out = search_dir / f"best-{trial}"  # per trial: a resumed search that crowns another one retrains it
        r = subprocess.run([sys.executable, "-m", "cifar_dist.train", "--config", str(best), "--output-dir", str(out),
                            "--test-subset", str(args.test_subset)])
        if r.returncode:
            return r.returncode
        import json

        summary = json.loads((out / "summary.json").read_text())
        print(f"best configuration retrained on the full training set: test acc {summary['test_acc']:.2%} ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
