"""Ray Tune search over ResNet shape and training settings: `python tune/search.py ...` (see docs/search.md).

Every trial calls the same `cifar_dist.train.train` as `accelerate launch cifar_dist/train.py`, ranks on
a validation split carved out of the training set (never the test set), reports each epoch (metrics and
checkpoint) to Tune so ASHA can stop weak trials early, PBT can have weak trials copy strong ones, and a
failed trial resumes from its checkpoint. The best configuration is written as `best.yaml`, which
train.py trains directly (with `best-replay.sh` when PBT changed its settings during training).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cifar_dist import budget, folders, tracking
from cifar_dist.backends import BACKENDS, is_deepspeed
from cifar_dist.config import FOLDER_NEEDS_DIR, TOP_FIELDS, ConfigError, DefaultsShown, OneLineParser
from cifar_dist.data import PER_FILE, SYNTHETIC_SIZES, TRAIN_FILES, data_root
from cifar_dist.search.report import journals, trial_rows, write_best, write_record, write_table
from cifar_dist.search.schedulers import POPULATION, SCHEDULERS, checkpoints_to_keep, make_scheduler
from cifar_dist.search.space import SearchError, check_mutations, check_space, load_space, merged, population, to_tune
from cifar_dist.search.storage import state_problem, whole_files
from cifar_dist.search.trial import TUNE_DIR, run_trial
from cifar_dist.settings import allowed, describe

PROG = "tune/search.py"
BUDGETED_MAX_T = 10_000  # ASHA's last rung under --trial-budget: past any plan, so no trial is cut short by it
WAITING_CPU = 0.1  # what a Ray Train trial's own function takes: it only waits on its workers
SPACE = Path(__file__).resolve().parents[2] / "tune" / "space.yaml"


def setting_help(name: str) -> str:
    """The help of a train.py setting the search hands to every trial, as config.py declares it."""
    return describe(*TOP_FIELDS[name])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=DefaultsShown)
    a = p.add_argument
    a("--space", type=Path, default=SPACE, help="search space YAML (default: tune/space.yaml)")
    a("--num-samples", type=int, default=8, help="configurations to sample (x each grid point)")
    a("--max-epochs", type=int, default=10, help="epochs of a trial that is never stopped")
    a("--trial-budget", default="", help="instead of --max-epochs, every trial trains to this deadline (90s, 10m): "
      "the epochs that fit this machine, so architectures are compared at equal cost (ASHA)")
    a("--scheduler", default="asha", choices=SCHEDULERS, help="asha: stop weak trials early; pbt/pb2: population-"
      "based training, weak trials copy strong ones and change the space's mutate: settings (pb2: pip install "
      "'.[pb2]')")
    a("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    a("--reduction-factor", type=int, default=2, help="ASHA: keep the best 1/N at each rung")
    a("--perturbation-interval", type=int, default=2, help="PBT/PB2: epochs between a trial's exploit/explore steps")
    a("--quantile-fraction", type=float, default=0.25, help="PBT/PB2: the bottom fraction copies the top fraction")
    a("--dataset", default="cifar10", choices=allowed(*TOP_FIELDS["dataset"]), help=setting_help("dataset"))
    a("--data-dir", default="", help=setting_help("data_dir"))
    a("--train-subset", type=int, default=0, help="train on the first N images (0: all)")
    a("--test-subset", type=int, default=0, help="test images for --retrain-best (0: all)")
    a("--val-size", type=int, default=None, help="validation images held out of the training set, on which trials "
      "are ranked (default: a tenth of it, at most 5,000)")
    a("--cpus-per-trial", type=float, default=1, help="CPUs per trial (per worker with --workers-per-trial)")
    a("--gpus-per-trial", type=float, default=0, help="GPUs per trial; fractions share a GPU (0.5: two trials)")
    a("--workers-per-trial", type=int, default=1, help="each trial an N-process DDP job (Ray Train)")
    a("--backend", default="ddp", choices=sorted(BACKENDS), help="distribution of a trial: ddp or a DeepSpeed "
      "ZeRO config of the launcher (always Ray Train workers)")
    a("--max-concurrent", type=int, default=0, help="trials at once (0: as many as the resources allow)")
    a("--mixed-precision", default="auto", choices=allowed(*TOP_FIELDS["mixed_precision"]),
      help=f"every trial: {setting_help('mixed_precision')}")
    a("--tracker", default="none", help="tracker of every trial (wandb: one run per trial, grouped by search)")
    a("--seed", type=int, default=0, help="seed of the search (which trials it samples) and of every trial (fixes "
      "the validation split)")
    a("--output-dir", type=Path, default=None, help="search directory (default runs/search-<timestamp>)")
    a("--address", default=os.environ.get("RAY_ADDRESS", ""), help="join this Ray cluster (default $RAY_ADDRESS); "
      "'local': always start a new Ray here, even if one is running")
    a("--resume", action="store_true", help="continue the interrupted search in --output-dir")
    a("--max-failures", type=int, default=1, help="retries of a trial that raises")
    a("--retrain-best", action="store_true", help="train best.yaml on the full training set; report test accuracy")
    a("--verbose", action="store_true", help="show the trials' own output")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_samples", "max_epochs", "grace_period", "workers_per_trial", "max_failures"):
        least = 0 if name == "max_failures" else 1
        if getattr(args, name) < least:
            raise SearchError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.reduction_factor < 2:
        raise SearchError(f"--reduction-factor must be >= 2, got {args.reduction_factor}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise SearchError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    n_train = SYNTHETIC_SIZES[0] if args.dataset == "synthetic" else PER_FILE * len(TRAIN_FILES)
    if args.dataset == "folder":
        n_train = folder_pictures(args.data_dir)
    if args.val_size is None:
        args.val_size = min(5000, n_train // 10)
    if args.val_size <= 0:
        raise SearchError("--val-size must be positive: trials are ranked on the validation split")
    if args.val_size >= n_train:
        raise SearchError(f"--val-size {args.val_size} leaves no training images: the {args.dataset} training set "
                          f"has {n_train}")
    if args.trial_budget:
        try:
            budget.check_budget(args.trial_budget)
        except ConfigError as e:
            raise SearchError(str(e).replace("time_budget", "--trial-budget")) from None
        if args.scheduler in POPULATION:
            raise SearchError(f"--trial-budget does not go with --scheduler {args.scheduler}: a population trains in "
                              "step, epoch by epoch; use --max-epochs")
    elif args.grace_period > args.max_epochs:
        raise SearchError(f"--grace-period {args.grace_period} exceeds --max-epochs {args.max_epochs}")
    if args.scheduler in POPULATION:
        if not 1 <= args.perturbation_interval < args.max_epochs:
            raise SearchError(f"--perturbation-interval must be at least 1 and below --max-epochs {args.max_epochs}, "
                              f"got {args.perturbation_interval} (a trial is never perturbed at its last epoch)")
        if not 0 < args.quantile_fraction <= 0.5:
            raise SearchError(f"--quantile-fraction must be in (0, 0.5], got {args.quantile_fraction}")
        if args.scheduler == "pb2" and not all(importlib.util.find_spec(m) for m in ("GPy", "sklearn")):
            raise SearchError("--scheduler pb2 needs GPy and scikit-learn: pip install -e '.[pb2]'")
        if args.max_concurrent:  # Tune would not start the rest before the first ones finished
            raise SearchError(f"--max-concurrent does not go with --scheduler {args.scheduler}: the population "
                              "trains together (trials take turns when the cluster is smaller)")


def folder_pictures(data_dir: str) -> int:
    """The training pictures of --dataset folder (before its test split), or one line why there are none."""
    if not data_dir:
        raise SearchError(FOLDER_NEEDS_DIR)
    try:
        train_dir = folders.layout(Path(data_dir).expanduser())[0]
        return len(folders.listing(train_dir, folders.class_names(train_dir)))
    except folders.FolderError as e:
        raise SearchError(str(e)) from None


def base_overrides(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """What every trial shares: data, budget, and honest evaluation (validation only). Paths are made
    absolute: Ray runs each trial in a working directory of its own."""
    data_dir = str(data_root(args.data_dir, args.dataset).resolve()) if args.dataset != "synthetic" else args.data_dir
    return dict(dataset=args.dataset, data_dir=data_dir, train_subset=args.train_subset, val_size=args.val_size,
                eval_test=False, eval_every=1, epochs=args.max_epochs, time_budget=args.trial_budget, seed=args.seed,
                keep_checkpoints=1,
                mixed_precision=args.mixed_precision, tracker=args.tracker, group=name,
                cpu_threads=max(1, int(args.cpus_per_trial)))  # the CPUs Ray reserved for each process


def check_address(address: str) -> None:
    """Fail in seconds, with one line, instead of waiting on a cluster that is not there."""
    if address in ("", "auto", "local"):  # Ray's own words: find one running here / start a new one here
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or hostport, int(port) if port.isdigit() else 6379), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot reach the Ray cluster at {address} ({e.__class__.__name__}: {e})") from None


def ray_train(args: argparse.Namespace) -> bool:
    """Whether each trial is a Ray Train job (DDP or DeepSpeed workers) rather than one process."""
    return args.workers_per_trial > 1 or is_deepspeed(args.backend)


def trial_needs(args: argparse.Namespace) -> dict[str, float]:
    """What one trial takes from the cluster: its workers, and a Ray Train trial's waiting function."""
    return {"CPU": args.cpus_per_trial * args.workers_per_trial + (WAITING_CPU if ray_train(args) else 0),
            "GPU": args.gpus_per_trial * args.workers_per_trial}


def start_ray(args: argparse.Namespace, trials: int) -> None:
    """Start or join Ray; refuse a trial (or, for PBT over Ray Train trials, a population) it cannot hold.
    The dashboard runs for Ray Train trials: it serves the state API through which Ray Train frees the
    workers of a trial that Tune stopped (ASHA) or paused (PBT); without it they would hold their CPUs."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # (read when ray is imported)
    import ray

    check_address(args.address)
    # A local Ray starts one idle Python worker per CPU for the first driver; a search's trials are actors
    # that never took them (measured: ~1.5 CPU-s each, every search, for nothing).
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Ray Train starts a PreemptionWatcher actor with every trial's workers, to act on an autoscaler draining
    # a node. A Ray started here (its processes inherit this environment) has no autoscaler; SLURM's end of
    # a job is a signal (slurm/tune.sh). Measured: 1.7 CPU-s a trial start, and a poll every 5 s, for nothing.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs: dict[str, Any] = dict(include_dashboard=ray_train(args), log_to_driver=args.verbose,
                                  configure_logging=True, logging_level="ERROR")
    if ray_train(args):
        kwargs.update(own_state_api())
    context = init_ray(args.address or None, kwargs)
    if ray_train(args) and context.dashboard_url:  # this process's own calls, on a cluster it joined too
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{context.dashboard_url}"
    have = ray.cluster_resources()
    for kind, need in trial_needs(args).items():
        if need > have.get(kind, 0):
            raise SearchError(f"a trial needs {need:g} {kind}s but the Ray cluster has {have.get(kind, 0):g}")
        # PBT takes turns by pausing trials; a Ray Train trial cannot wait its turn, so all run at once
        if args.scheduler in POPULATION and ray_train(args) and need * trials > have.get(kind, 0) + 1e-9:
            raise SearchError(f"--scheduler {args.scheduler} with {args.workers_per_trial}-worker trials runs the "
                              f"whole population at once: {trials} trials need {need * trials:g} {kind}s, the Ray "
                              f"cluster has {have.get(kind, 0):g}; use fewer --num-samples or smaller trials")


def init_ray(address: str | None, kwargs: dict[str, Any]) -> Any:
    """ray.init, started a second time if the local Ray it starts misses its start-up deadline. Ray gives
    its raylet a fixed 30 s to register with its GCS, and on a busy machine (two cores, another search or
    a SLURM job's Ray beside this one) that has not always been enough: the search then ended before it
    began. The processes of the first try are this process's children; they are stopped first."""
    import ray

    try:
        return ray.init(address=address, **kwargs)
    except Exception as e:
        if address or "timed out during startup" not in str(e):
            raise
    print(f"{PROG}: the local Ray did not start within Ray's 30 s (a busy machine?); starting it again",
          file=sys.stderr, flush=True)
    ray.shutdown()
    for child in own_children():
        try:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return ray.init(address=address, **kwargs)


def own_children() -> list[int]:
    """This process's children (Linux: from /proc, as Ray's own processes are started here)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        found += [int(pid) for pid in task.read_text().split()]
    return found


def own_state_api() -> dict[str, Any]:
    """Point Ray's state API at the Ray this search starts. Ray finds the cluster of a state call made in
    a Ray process from $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else by looking for running clusters,
    and with two on the machine (a second search, a SLURM job's Ray, a test beside a test) that lookup
    fails ("Found multiple active Ray instances") or picks the newest. Ray Train frees the workers of a
    trial Tune paused or stopped through that API: it then never did, and the search waited on CPUs that
    were never freed. So the dashboard, which serves the API, gets a port chosen here, and its address is
    in the environment before Ray starts: every Ray process started now inherits it. (Joining a running
    cluster, Ray ignores the port; slurm/tune.sh sets $RAY_ADDRESS for the Ray it starts.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return dict(dashboard_host="127.0.0.1", dashboard_port=port)


def make_tuner(args: argparse.Namespace, space: dict[str, Any], mutations: dict[str, Any], base: dict[str, Any],
               search_dir: Path) -> Any:
    """The Tuner (or the restored one): the trial function, its resources, the scheduler on validation
    accuracy."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    workers, use_gpu = args.workers_per_trial, args.gpus_per_trial > 0
    per_worker = {"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial}
    trainable = tune.with_parameters(run_trial, base=base, search_dir=str(search_dir), workers=workers,
                                     use_gpu=use_gpu, per_worker=per_worker, backend=args.backend,
                                     ray_train=ray_train(args))
    # A Ray Train trial's function only waits on its workers, which ask for the real resources.
    resources = {"cpu": WAITING_CPU} if ray_train(args) else {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    trainable = tune.with_resources(trainable, resources)
    if ray_train(args) and not args.max_concurrent and args.scheduler not in POPULATION:
        import ray  # Tune counts only the functions: as many at once as their workers fit (PBT's all fit)

        have = ray.cluster_resources()
        args.max_concurrent = max(1, int(min(have.get(k, 0) // v for k, v in trial_needs(args).items() if v)))
    keep = checkpoints_to_keep(args.scheduler, args.perturbation_interval)
    # every file of Tune's written whole (search/storage.py): a search killed while writing one resumes
    run_config = tune.RunConfig(name=TUNE_DIR.name, storage_path=str((search_dir / TUNE_DIR.parent).resolve()),
                                storage_filesystem=whole_files(),
                                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=keep), verbose=0,
                                # before the scheduler: PBT never copies a finished trial
                                stop=None if args.trial_budget else {"epoch": args.max_epochs})
    if args.resume:
        return tune.Tuner.restore(str(tune_dir(search_dir).resolve()), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, storage_filesystem=whole_files())
    max_t = BUDGETED_MAX_T if args.trial_budget else args.max_epochs  # a budgeted trial ends by its own plan
    scheduler = make_scheduler(args.scheduler, max_t, mutations, args.grace_period, args.reduction_factor,
                               args.perturbation_interval, args.quantile_fraction)
    random.seed(args.seed)  # PBT's and PB2's choices (which donor, which perturbation) are drawn here
    np.random.seed(args.seed)  # PB2's too
    # The same --seed samples the same trials. The limit goes to the sampler itself: Tune ignores
    # max_concurrent_trials (with a log line) when it is handed a sampler, and ran every trial at once
    sampler = BasicVariantGenerator(random_state=args.seed, max_concurrent=args.max_concurrent)
    # reuse_actors: a trial process trains the next trial too (see trial.run_trial)
    tune_config = tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler, search_alg=sampler,
                                  num_samples=args.num_samples, reuse_actors=True)
    return tune.Tuner(trainable, param_space=to_tune(merged(space, mutations)), tune_config=tune_config,
                      run_config=run_config)


def tune_dir(search_dir: Path) -> Path:
    """Tune's experiment folder of a search: ray/tune/, or the search folder itself (searches before 12/2026)."""
    return search_dir if (search_dir / "tuner.pkl").exists() else search_dir / TUNE_DIR


def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Every check that can fail before a trial starts (the arguments, the search directory, the space,
    the Ray cluster); the search directory, the space, its mutations and what every trial shares."""
    check_args(args)
    search_dir = (args.output_dir or Path(f"runs/search-{datetime.now():%Y%m%d-%H%M%S}")).resolve()
    if args.resume and not (tune_dir(search_dir) / "tuner.pkl").exists():
        raise SearchError(f"nothing to resume in {search_dir} (no {TUNE_DIR / 'tuner.pkl'})")
    if args.resume and (problem := state_problem(tune_dir(search_dir))):  # Ray would start the search anew
        raise SearchError(f"cannot resume the search in {search_dir} (nothing was changed): {problem}")
    if not args.resume and search_dir.exists() and any(search_dir.iterdir()):
        raise SearchError(f"{search_dir} already holds a search; use --resume or another --output-dir")
    space, mutations = load_space(args.space)
    base = base_overrides(args, search_dir.name)
    n = population(space, args.num_samples)
    if args.scheduler in POPULATION:
        if not mutations:
            raise SearchError(f"--scheduler {args.scheduler} needs a mutate: section in the search space "
                              f"{args.space}: the settings it may change during a trial")
        if n < 2:
            raise SearchError(f"--scheduler {args.scheduler} needs a population of at least 2 trials, got {n} "
                              f"(--num-samples {args.num_samples} x grid points)")
    check_mutations(mutations, base, args.scheduler)
    check_space(merged(space, mutations), base)  # the first values
    check_space(mutations, base)  # every value a mutation can reach (a range is kept inside its bounds)
    start_ray(args, n)
    return search_dir, space, mutations, base


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        search_dir, space, mutations, base = prepare(args)
    except SearchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    name, pbt = search_dir.name, args.scheduler in POPULATION
    search_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        shutil.copy(args.space, search_dir / "space.yaml")
    how = (f"{args.scheduler.upper()} every {args.perturbation_interval} epochs, mutating {', '.join(mutations)}"
           if pbt else f"ASHA grace {args.grace_period}")
    length = f"a {args.trial_budget} budget each" if args.trial_budget else f"{args.max_epochs} epochs"
    print(f"search {name}: {args.num_samples} samples x {length}, {how}; "
          f"ranking on {args.val_size} validation images; results in {search_dir}", flush=True)
    grid = make_tuner(args, space, mutations, base, search_dir).fit()
    rows = trial_rows(grid, args.max_epochs, base, pbt)
    print(write_table(rows, search_dir / "results.csv"))
    events = journals(search_dir)
    found = write_best(grid, base, search_dir, events)
    images = write_record(search_dir, rows, events, found[1] if found else None, pbt)
    tracking.log_search(tracking.parse(args.tracker), search_dir, name, images, rows)
    if found is None:
        print(f"{PROG}: error: no trial finished an epoch; see {search_dir}/trials", file=sys.stderr)
        return 1
    best, trial, val_acc, commands = found
    print(f"best: {best} (val acc {val_acc:.2%}); train it with `accelerate launch cifar_dist/train.py --config {best}`"
          + (f", or replay the settings PBT gave it as it trained: bash {search_dir / 'best-replay.sh'}"
             if len(commands) > 1 else ""))
    # per trial: a resumed search that crowns another one retrains that one
    return retrain(commands, search_dir / f"best-{trial}", args.test_subset) if args.retrain_best else 0


def retrain(commands: list[list[str]], out: Path, test_subset: int) -> int:
    """Train the best configuration (or replay its schedule, one command per segment) on the full
    training set, as a run of its own, and report its test accuracy."""
    for args in commands:
        r = subprocess.run([sys.executable, "-m", "cifar_dist.train", *args, "--output-dir", str(out),
                            "--test-subset", str(test_subset)])
        if r.returncode:
            return r.returncode
    summary = json.loads((out / "summary.json").read_text())
    what = f"replayed ({len(commands)} segments)" if len(commands) > 1 else "retrained"
    print(f"best configuration {what} on the full training set: test acc {summary['test_acc']:.2%} ({out})")
    return 0
