"""A Tune trial: the one training function of cifar_dist.train, reporting each epoch (metrics and its
checkpoint) to Tune, in the trial's process or, for DDP and DeepSpeed trials, in Ray Train workers."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from cifar_dist.backends import deepspeed_plugin, is_deepspeed
from cifar_dist.model import build_model, count_params
from cifar_dist.search.space import trial_config


def run_trial(params: dict[str, Any], base: dict[str, Any], search_dir: str, workers: int, use_gpu: bool,
              per_worker: dict[str, float], backend: str) -> None:
    """The Tune trainable: the training function of train.py, reporting each epoch to Tune."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(search_dir) / "trials" / trial_id
    trial_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(trial_dir.with_suffix(".starts"), "a") as f:  # how often this trial was (re)started
        f.write(f"{time.time()}\n")
    restore_checkpoint(trial_dir)
    config = dict(params=params, base={**base, "run_name": trial_id}, trial_dir=str(trial_dir), backend=backend)
    if workers == 1 and not is_deepspeed(backend):
        train_and_report(config)
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # DeepSpeed needs a process group even for one worker: those trials always go through Ray Train.
    TorchTrainer(train_and_report, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
                 run_config=RunConfig(name=trial_id, storage_path=str(Path(search_dir) / "ray_train"),
                                      callbacks=[TuneReportCallback()])).fit()


def restore_checkpoint(trial_dir: Path) -> None:
    """A trial restored by Tune (after a failure, or a resumed search): put its epoch checkpoint back in
    the trial's run directory, where train() resumes from it."""
    from ray import tune

    if checkpoint := tune.get_checkpoint():
        with checkpoint.as_directory() as d:
            for epoch_dir in Path(d).glob("epoch-*"):
                target = trial_dir / "checkpoints" / epoch_dir.name
                if not target.exists():
                    shutil.copytree(epoch_dir, target)


def train_and_report(config: dict[str, Any]) -> None:
    """Runs in the trial process, or in each worker of a DDP trial (Ray Train sets up the process group).
    DeepSpeed comes as Accelerate's own DeepSpeedPlugin, built here from the backend's config file."""
    import ray
    from ray import tune

    from cifar_dist.train import train

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

    train(cfg, on_epoch=report, deepspeed_plugin=deepspeed_plugin(config["backend"]))
    for metrics, checkpoint_dir in last:  # now that summary.json and model.pt are written
        report(metrics, checkpoint_dir, final=True)
