"""A Tune trial: the one training function of cifar_dist.train, reporting each epoch (metrics and its
checkpoint) to Tune, in the trial's process or, for DDP and DeepSpeed trials, in Ray Train workers.

Each trial keeps a journal, `trials/<id>.events.jsonl`: its starts (with their settings), its reports,
and its PBT exploits (whose checkpoint it copied, from which epoch, the settings before and after).
Every reported checkpoint carries `origin.json` (whose it is and at which epoch), which is how a trial
restored by Tune tells its own checkpoint from a copied one.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cifar_dist.backends import deepspeed_plugin
from cifar_dist.model import build_model, count_params
from cifar_dist.rundir import LOCK, epoch_dirs, held
from cifar_dist.search.space import trial_config

ORIGIN = "origin.json"  # in every reported checkpoint: the trial, epoch and exploit count that made it
JOURNAL = ".events.jsonl"  # trials/<id>.events.jsonl
# Ray's own records, under the search directory beside ours: Tune's experiment (tuner.pkl, its trial folders
# and checkpoints) and each Ray Train trial's storage
TUNE_DIR, TRAIN_DIR = Path("ray") / "tune", Path("ray") / "train"
PREVIOUS_RUN_S = 120  # how long a restarted trial waits for its previous run's workers to be gone


def run_trial(params: dict[str, Any], base: dict[str, Any], search_dir: str, workers: int, use_gpu: bool,
              per_worker: dict[str, float], backend: str, ray_train: bool) -> None:
    """The Tune trainable: the training function of train.py, reporting each epoch to Tune. A Ray Train
    trial (DDP, or DeepSpeed, which needs a process group even for one worker) runs it in its workers."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(search_dir) / "trials" / trial_id
    trial_dir.parent.mkdir(parents=True, exist_ok=True)
    exploits = restore_checkpoint(trial_dir, trial_id, params)
    config = dict(params=params, base={**base, "run_name": trial_id}, trial_dir=str(trial_dir), backend=backend,
                  exploits=exploits, ray_train=ray_train)
    if not ray_train:
        # Tune runs one trial after another in the same process (reuse_actors: a trial then costs no
        # interpreter, torch and Ray start-up; that was most of a small trial's time). Each begins with
        # Accelerate's process state as a new process has it: the previous trial's is kept otherwise.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        train_and_report(config)
        return
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    # Ray Train prunes before its callbacks run, and a worker may be a report ahead of them: keep the
    # checkpoint being handed to Tune, the one after it and the one after that
    trainer = TorchTrainer(train_and_report, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                        resources_per_worker=per_worker),
                           run_config=RunConfig(name=trial_id, storage_path=str(Path(search_dir) / TRAIN_DIR),
                                                checkpoint_config=CheckpointConfig(num_to_keep=3),
                                                callbacks=[forward_to_tune(queue)]))
    forward_reports(trainer, queue, trial_dir)


def forward_reports(trainer: Any, queue: Any, trial_dir: Path) -> None:
    """Run a Ray Train job and report to Tune, from this trial's own thread, each epoch's metrics with its
    checkpoint (Ray's TuneReportCallback forwards only the checkpoint's path; PBT copies checkpoints that
    Tune holds)."""
    import queue as queues

    failed: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # raised again in the trial's thread, where Tune sees it
            failed.append(e)

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    while runner.is_alive() or not queue.empty():
        try:
            metrics, path = queue.get(timeout=1)
        except queues.Empty:
            continue
        report_to_tune(trial_dir, metrics, Path(path) if path else None)
    if failed:
        raise failed[0]


def forward_to_tune(queue: Any) -> Any:
    """The Ray Train callback that hands rank 0's metrics and the persisted checkpoint's path to the trial."""
    from ray.train.v2.api.callback import UserCallback

    class Forward(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put((metrics[0], checkpoint.path if checkpoint else None))

    return Forward()


def restore_checkpoint(trial_dir: Path, trial_id: str, params: dict[str, Any]) -> int:
    """Put the checkpoint Tune hands a (re)started trial in its run directory, where train() resumes from
    it: its own (after a failure, a pause, a resumed search) or a top trial's (a PBT exploit, recorded in
    the journal; the run directory then continues the donor's run and drops what fixed its own). Returns
    the trial's exploits so far."""
    from ray import tune

    events = read_events(trial_dir)
    exploits = sum(e["event"] == "exploit" for e in events)
    if checkpoint := tune.get_checkpoint():
        wait_for_previous_run(trial_dir)
        with checkpoint.as_directory() as d:
            origin = json.loads((Path(d) / ORIGIN).read_text()) if (Path(d) / ORIGIN).exists() else {}
            if origin.get("trial", trial_id) != trial_id and not retried(events, origin):
                exploits += 1
                own = [e for e in events if e["event"] == "report"]
                before: dict[str, Any] = next((e["params"] for e in reversed(events) if e["event"] == "start"), {})
                append_event(trial_dir, event="exploit", epoch=own[-1]["epoch"] if own else 0, donor=origin["trial"],
                             donor_epoch=origin["epoch"], donor_exploits=origin["exploits"], before=before,
                             donor_params=origin["params"], after=params)
                shutil.rmtree(trial_dir, ignore_errors=True)  # its own run: config, pictures, W&B run id
            # Tune's checkpoint is where the trial is: a Ray Train trial may have trained on (even to the
            # end) after the report Tune paused it at
            (trial_dir / "summary.json").unlink(missing_ok=True)
            shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
            for epoch_dir in epoch_dirs(Path(d)):
                shutil.copytree(epoch_dir, trial_dir / "checkpoints" / epoch_dir.name)
    append_event(trial_dir, event="start", params=params, exploits=exploits, pid=os.getpid())  # pid: which process
    return exploits


def wait_for_previous_run(trial_dir: Path) -> None:
    """A paused or stopped Ray Train trial's workers end a moment after Tune restarts the trial: wait
    until none holds the run's lock, before its directory is changed under them."""
    deadline = time.monotonic() + PREVIOUS_RUN_S
    while held(trial_dir):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the previous run of {trial_dir} did not end in {PREVIOUS_RUN_S}s (it holds {LOCK})")
        time.sleep(0.5)


def report_to_tune(trial_dir: Path, result: dict[str, Any], checkpoint_dir: Path | None) -> None:
    """One epoch to Tune, with the trial's checkpoint folder, and into the journal: what Tune was told."""
    from ray import tune

    append_event(trial_dir, event="report", **result)
    tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None)


def retried(events: list[dict[str, Any]], origin: dict[str, Any]) -> bool:
    """Whether a copied checkpoint is the one the last exploit copied, handed again: the trial failed, or
    the search was interrupted and resumed from a saved state older than the trial's later reports. Not a
    new exploit: synchronous PBT copies a donor's checkpoint of the current interval, never one copied before."""
    last = next((e for e in reversed(events) if e["event"] == "exploit"), None)
    return last is not None and ((last["donor"], last["donor_epoch"], last["donor_exploits"])
                                 == (origin["trial"], origin["epoch"], origin["exploits"]))


def journal(trial_dir: Path) -> Path:
    return trial_dir.with_name(trial_dir.name + JOURNAL)


def append_event(trial_dir: Path, **event: Any) -> None:
    """One event, stamped with the time it was written (when trials ran, and which ran at once)."""
    with open(journal(trial_dir), "a") as f:
        f.write(json.dumps({**event, "time": time.time()}, default=plain) + "\n")


def read_events(trial_dir: Path) -> list[dict[str, Any]]:
    """The journal's events; a last line cut short (a trial killed while writing it) is left out."""
    path = journal(trial_dir)
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def plain(value: Any) -> Any:
    """numpy scalars (Tune's samplers return some) as Python numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def train_and_report(config: dict[str, Any]) -> None:
    """Runs in the trial process, or in each worker of a DDP trial (Ray Train sets up the process group).
    DeepSpeed comes as Accelerate's own DeepSpeedPlugin, built here from the backend's config file."""
    import ray

    from cifar_dist.train import train

    trial_dir, trial_id = Path(config["trial_dir"]), config["base"]["run_name"]
    cfg = trial_config(config["params"], config["base"], trial_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    params = count_params(build_model(cfg.model))
    last: list[tuple[dict[str, Any], Path]] = []

    def report(metrics: dict[str, Any], checkpoint_dir: Path, final: bool = False) -> None:
        if metrics["epoch"] == cfg.epochs and not final:  # Tune ends a trial at its last report: let train() finish
            last.append((metrics, checkpoint_dir))
            return
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        result.update(params=params, exploits=config["exploits"], planned_epochs=cfg.epochs)  # (a budget plans them)
        if rank0:
            origin = dict(trial=trial_id, epoch=metrics["epoch"], exploits=config["exploits"], params=config["params"])
            (checkpoint_dir.parent / ORIGIN).write_text(json.dumps(origin, default=plain))
        if not config["ray_train"]:
            report_to_tune(trial_dir, result, checkpoint_dir.parent)
        else:  # rank 0's checkpoint reaches Tune through forward_reports
            ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir.parent))
                             if rank0 else None)

    train(cfg, on_epoch=report, deepspeed_plugin=deepspeed_plugin(config["backend"]))
    for metrics, checkpoint_dir in last:  # now that summary.json and model.pt are written
        report(metrics, checkpoint_dir, final=True)
