"""Real Ray Tune searches (local Ray on this machine) through `python tune/search.py`."""
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import (
    BUDGET_END_UNDER_LOAD_S,
    ROOT,
    assert_one_line_error,
    env,
    free_port,
    kill_tree,
    metrics,
    run,
    summary,
)

# The searches of this module run two at a time, each with a Ray of its own (two searches on one machine
# must work: see another_ray below), in two groups of about the same length (ray-a, ray-b): more at once
# on two cores, and Ray's own processes slowed everything down (measured: four workers, slower than three).
pytestmark = pytest.mark.timeout(420)
SEARCH = str(ROOT / "tune" / "search.py")
DATA = ["--dataset", "synthetic", "--val-size", "300"]
TINY = {"stages": 2, "base_width": 8, "blocks_per_stage": 1, "batch_size": 100}
# What mutates in these searches changes no trained weight: tta only evaluation, test_subset nothing a
# trial computes (trials never see the test set). So a trial that copies a top trial trains its next
# epoch exactly as that trial did, if (and only if) it got its weights. (PB2 takes ranges only.)
MUTATE = {"pbt": {"tta": {"choice": ["none", "flip"]}}, "pb2": {"test_subset": {"randint": [0, 100]}}}


def search(args, cwd, timeout=400, **extra):
    """The real command. RAY_ADDRESS=local: a Ray of its own, even beside another test's (Ray would join it)."""
    return run([sys.executable, SEARCH, *DATA, *args], timeout, cwd=cwd, env=env(RAY_ADDRESS="local", **extra))


def space(tmp_path, tiny=True, **entries):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**(TINY if tiny else {}), **entries}))
    return str(path)


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.xdist_group("ray-b")
def test_asha_search_writes_results_and_a_trainable_best_config(tmp_path, train_here):
    out = tmp_path / "s"
    # the same good and hopeless lr twice each; one at a time, so ASHA has seen a good one at epoch 1
    r = search(["--space", space(tmp_path, lr={"grid": [0.05, 1e-5, 0.05, 1e-5]}), "--num-samples", "1",
                "--max-epochs", "2", "--max-concurrent", "1", "--output-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = rows(out)
    assert len(table) == 4
    spans = sorted((es[0]["time"], es[-1]["time"]) for es in (journal(out, row["trial"]) for row in table))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # one at a time
    # in fewer processes than trials: a trial's process goes on to the next (Tune's reuse_actors)
    assert len({e["pid"] for row in table for e in journal(out, row["trial"]) if e["event"] == "start"}) < 4
    assert {row["status"] for row in table if float(row["lr"]) < 1e-3} == {"stopped early"}
    assert {row["status"] for row in table if float(row["lr"]) > 1e-3} == {"completed"}
    assert all(row["params"] == table[0]["params"] for row in table) and int(table[0]["params"]) > 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["lr"] == 0.05 and best["val_size"] == 0 and best["eval_test"] is True
    assert best["model"]["widths"] == [8, 16]
    assert best["cpu_threads"] == 0  # a retrain computes with the machine it runs on, not a trial's share
    completed = [t for t in (out / "trials").glob("*_0000?") if (t / "summary.json").exists()]
    assert completed and all(summary(t)["cpu_threads"] == 1 for t in completed)  # the one CPU Ray reserved
    for trial in (out / "trials").glob("*_0000?"):
        assert all("test_acc" not in m for m in metrics(trial))  # trials never look at the test set
        assert all("val_acc" in m for m in metrics(trial))
    assert "val_acc" in r.stdout and "best:" in r.stdout
    # ours beside one folder of Ray's own (tuner.pkl, experiment_state-*.json, run_trial_... folders)
    assert sorted(p.name for p in out.iterdir()) == ["best.yaml", "history.csv", "ray", "results.csv", "search.png",
                                                     "space.yaml", "trials"]
    assert (out / "ray" / "tune" / "tuner.pkl").is_file()
    trained = train_here(["--config", str(out / "best.yaml"), "--epochs", "1", "--output-dir", str(tmp_path / "b")])
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert summary(tmp_path / "b")["test_acc"] > 0.3


@pytest.mark.xdist_group("ray-b")
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    out = tmp_path / "s"
    args = ["--space", space(tmp_path, lr={"grid": [0.05, 0.04, 0.03, 0.02]}), "--num-samples", "1",
            "--max-epochs", "2", "--max-concurrent", "1", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, SEARCH, *DATA, *args], cwd=tmp_path,
                            env=env(TUNE_GLOBAL_CHECKPOINT_S="0", RAY_ADDRESS="local"),
                            stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    done = lambda: [p for p in (out / "trials").glob("*_0000?") if (p / "summary.json").exists()]  # noqa: E731
    while time.time() < deadline and len(done()) < 2:
        time.sleep(0.5)
    time.sleep(2)  # let Tune record the finished trials
    kill_tree(proc)  # the driver and the local Ray it started, as a preempted job would lose them
    finished = {p.name for p in done()}
    assert len(finished) >= 2 and not (out / "results.csv").exists(), (tmp_path / "first.log").read_text()[-3000:]
    r = search([*args, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(rows(out)) == 4 and {row["status"] for row in rows(out)} == {"completed"}
    for name in finished:  # a finished trial was not started again
        assert [e["event"] for e in journal(out, name)].count("start") == 1


@pytest.mark.xdist_group("ray-a")
def test_interrupted_pbt_search_resumes_the_population_and_keeps_its_exploits(tmp_path):
    """Killed after the first perturbation, in the second interval: --resume brings every trial back
    from the checkpoint Tune last saved for it (its own, or a copied one) and the population finishes;
    then the search's records (the PBT case of test_pbt_search_copies_top_trials_weights_and_records_every_exploit).
    Three epochs: the resumed population's first synchronisation is at the epoch before its last, where a
    new Ray scheduler set the next one to the trials' own epoch and the search waited for ever
    (schedulers.SyncAfterResume)."""
    out = tmp_path / "s"
    args = ["--space", space(tmp_path, lr={"grid": [0.05, 1e-5, 0.05, 1e-5]}, mutate=MUTATE["pbt"]), "--scheduler",
            "pbt", "--num-samples", "1", "--max-epochs", "3", "--perturbation-interval", "1", "--mixed-precision",
            "no", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, SEARCH, *DATA, *args], cwd=tmp_path,
                            env=env(TUNE_GLOBAL_CHECKPOINT_S="0", RAY_ADDRESS="local"),
                            stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    reports = lambda: sum(e["event"] == "report" for p in (out / "trials").glob("*.events.jsonl")  # noqa: E731
                          for e in journal(out, p.name.removesuffix(".events.jsonl")))
    while time.time() < deadline and reports() < 6:  # 4 at epoch 1, then 2 at epoch 2
        time.sleep(0.5)
    kill_tree(proc)
    assert reports() >= 6 and not (out / "results.csv").exists(), (tmp_path / "first.log").read_text()[-3000:]
    r = search([*args, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(row["status"], row["epochs"]) for row in rows(out)] == [("completed", "3")] * 4
    reports = assert_exploits_continue_from_donors(out, r.stdout)
    for trial, rs in reports.items():
        assert sorted({e["epoch"] for e in rs}) == [1, 2, 3], trial  # an epoch may be trained again, none lost
    assert_search_records(out, reports)


@pytest.mark.xdist_group("ray-b")
def test_failing_trial_is_retried_reported_failed_and_the_search_completes(tmp_path):
    """And --trial-budget: the trial that trains plans its own epochs to the budget and completes them."""
    out = tmp_path / "s"
    # batch 5000 > the 1,700 training images: that trial raises every time it starts
    r = search(["--space", space(tmp_path, batch_size={"grid": [100, 5000]}, lr=0.05), "--num-samples", "1",
                "--trial-budget", "20s", "--max-failures", "1", "--output-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    by_batch = {row["batch_size"]: row for row in rows(out)}
    assert by_batch["5000"]["status"] == "failed" and "larger than the training set" in by_batch["5000"]["error"]
    assert by_batch["100"]["status"] == "completed" and "a 20s budget each" in r.stdout
    plan = summary(out / "trials" / by_batch["100"]["trial"])["time_budget"]
    assert plan["budget_s"] == 20 and int(by_batch["100"]["epochs"]) == plan["epochs"] >= 1  # its own plan, ended
    assert plan["used_s"] <= 20 + BUDGET_END_UNDER_LOAD_S  # (14.5 s once on an idle machine)
    failed = next(p.name.removesuffix(".events.jsonl") for p in (out / "trials").glob("*.events.jsonl")
                  if p.name.removesuffix(".events.jsonl").endswith("00001"))
    assert [e["event"] for e in journal(out, failed)] == ["start", "start"]  # tried, then retried once


@pytest.fixture(scope="module")
def another_ray():
    """A second Ray on this machine, with its dashboard, as another user's search or a SLURM job's Ray
    would be. Ray's state API, through which Ray Train frees a paused trial's workers, then failed to find
    the search's own cluster ("Found multiple active Ray instances"), and the search below waited for
    ever. Stopped exactly (not `ray stop`, which would stop every Ray here)."""
    proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=1",
                             "--include-dashboard=true", f"--dashboard-port={free_port()}", "--disable-usage-stats"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield
    kill_tree(proc)


@pytest.mark.xdist_group("ray-a")
def test_pbt_with_two_worker_trials(tmp_path, another_ray):
    """A good and a hopeless lr, side by side (PBT runs a population of Ray Train trials at once): the
    hopeless one copies a checkpoint the good one's 2 DeepSpeed workers saved, and goes on from it on 2
    workers, beside another Ray on the machine. One perturbation: each one restarts both trials' workers
    (4 trial starts of 8 processes each, about 165 CPU-seconds), and one is what this tests. DeepSpeed's
    sharded checkpoint is the harder copy; a DDP trial's checkpoint is the one the 1-worker searches copy,
    and its 2-worker world is the test below."""
    out = tmp_path / "s"
    sp = space(tmp_path, lr={"grid": [0.05, 1e-5]}, mutate=MUTATE["pbt"])
    r = search(["--space", sp, "--scheduler", "pbt", "--num-samples", "1", "--max-epochs", "2", "--perturbation-interval",
                "1", "--mixed-precision", "no", "--backend", "deepspeed-zero2", "--workers-per-trial", "2",
                "--cpus-per-trial", "0.45", "--output-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_exploits_continue_from_donors(out, r.stdout)
    assert {row["status"] for row in rows(out)} == {"completed"}
    assert_two_worker_worlds(out, "DeepSpeedEngine", "DEEPSPEED")


@pytest.mark.xdist_group("ray-a")
def test_a_two_worker_ddp_trial_is_one_world(tmp_path, another_ray):
    """--workers-per-trial 2 with DDP: each trial is one world of 2 Ray Train workers (one trial start)."""
    out = tmp_path / "s"
    r = search(["--space", space(tmp_path, lr=0.05), "--num-samples", "1", "--max-epochs", "1", "--mixed-precision",
                "no", "--workers-per-trial", "2", "--cpus-per-trial", "0.45", "--output-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["status"] for row in rows(out)] == ["completed"]
    assert_two_worker_worlds(out, "DistributedDataParallel", "MULTI_CPU")


def assert_two_worker_worlds(out, engine, distributed_type):
    """Every trial one world of 2 workers, with the same weights on both, DeepSpeed's own engine where it was asked for."""
    trials = [t for t in (out / "trials").iterdir() if t.is_dir()]
    assert trials
    for trial in trials:
        s = summary(trial)
        assert s["world_size"] == 2 and s["rank_weight_digests"][0] == s["rank_weight_digests"][1]
        assert s["engine"] == engine and s["distributed_type"] == f"DistributedType.{distributed_type}"


def journal(out, trial):
    return [json.loads(line) for line in (out / "trials" / f"{trial}.events.jsonl").read_text().splitlines()]


@pytest.mark.xdist_group("ray-b")
def test_pbt_search_copies_top_trials_weights_and_records_every_exploit(tmp_path):
    """PB2 (PBT's own search is the interrupted one above, whose records are checked the same way)."""
    out = tmp_path / "s"
    # two good lrs and two hopeless ones
    sp = space(tmp_path, lr={"grid": [0.05, 1e-5, 0.05, 1e-5]}, mutate=MUTATE["pb2"])
    # one perturbation (after epoch 1) and an epoch on the copied weights: what this tests
    # and the best trial retrained (or its schedule replayed) as a run of its own on the full training set
    r = search(["--space", sp, "--scheduler", "pb2", "--num-samples", "1", "--max-epochs", "2",
                "--perturbation-interval", "1", "--mixed-precision", "no", "--output-dir", str(out), "--retrain-best",
                "--test-subset", "100"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (best,) = [p for p in out.iterdir() if p.name.startswith("best-") and p.is_dir()]
    assert summary(best)["epochs_completed"] == 2 and "test_acc" in summary(best)
    assert "on the full training set: test acc" in r.stdout
    assert_search_records(out, assert_exploits_continue_from_donors(out, r.stdout))


def assert_search_records(out, reports):
    """history.csv holds every report; no trial looked at the test set; exploits counted; search.png drawn."""
    history = rows_of(out / "history.csv")
    assert len(history) == sum(len(v) for v in reports.values()) and all(row["val_acc"] for row in history)
    for trial in reports:  # ranked on validation only: no trial ever looked at the test set
        assert all("test_acc" not in m for m in reports[trial])
        assert all("test_acc" not in m for m in metrics(out / "trials" / trial))
    assert sum(int(row["exploits"]) for row in rows(out)) >= 1
    picture = np.asarray(Image.open(out / "search.png").convert("L"), dtype=float)
    assert picture.shape[0] > 300 and picture.std() > 10  # drawn, not blank


def assert_exploits_continue_from_donors(out, log):
    """At least one exploit, and after each one the trial's first report equals its donor's report from
    the copied checkpoint (its own weights would have given another loss). Returns every trial's reports."""
    exploits = rows_of(out / "exploits.csv")
    assert exploits, log[-3000:]  # the hopeless trials were copied over at least once
    reports = {t: [e for e in journal(out, t) if e["event"] == "report"] for t in {row["trial"] for row in rows(out)}}
    for row in exploits:
        trial, donor, donor_epoch = row["trial"], row["donor"], int(row["donor_epoch"])
        events = journal(out, trial)
        k, x = next((i + 1, e) for i, e in enumerate(e for e in events if e["event"] == "exploit")
                    if (e["donor"], e["donor_epoch"], e["epoch"]) == (donor, donor_epoch, int(row["epoch"])))
        first = next(e for e in reports[trial] if e["exploits"] == k)  # its first report on the copied weights
        same = next(e for e in reports[donor] if e["epoch"] == donor_epoch + 1 and e["exploits"] == x["donor_exploits"])
        assert first["epoch"] == donor_epoch + 1
        assert (first["train_loss"], first["train_acc"]) == (same["train_loss"], same["train_acc"])
        assert x["after"]["lr"] == x["donor_params"]["lr"]  # copied; lr does not mutate here
    return reports


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("entries, extra, text", [
    ({"lr": {"choice": []}}, [], "lr choice is empty"),
    ({"lr": {"loguniform": [0.5, 0.05]}}, [], "bounds are reversed"),
    ({"base_width": {"choice": [16, 0]}}, [], "base_width must be positive"),
    ({"tiny": False, "widths": [8, -16], "blocks": [1, 1], "strides": [1, 2]}, [], "widths must be positive"),
    ({"widths": [8, 16]}, [], "widths conflict with stages"),
    ({"learning_rate": 0.1}, [], "unknown setting 'learning_rate'"),
    ({"epochs": {"uniform": [1, 3]}}, [], "epochs takes whole numbers; use randint"),
    ({"base_width": {"loguniform": [8, 32]}}, [], "base_width takes whole numbers"),
    ({"optimizer": {"choice": ["sgd", "lion"]}}, [], "optimizer='lion': unknown optimizer 'lion'"),
    ({"preset": {"grid": ["seed3", "auto"]}, "tiny": False}, ["--trial-budget", "1m"],
     "search space: preset='auto' is train.py's choice for a time budget"),
    ({}, ["--val-size", "2000"], "--val-size 2000 leaves no training images: the synthetic training set has 2000"),
    ({}, ["--address", "127.0.0.1:9"], "cannot reach the Ray cluster at 127.0.0.1:9"),
    ({}, ["--scheduler", "hyperband"], "argument --scheduler: invalid choice: 'hyperband'"),
    ({}, ["--scheduler", "pbt"], "--scheduler pbt needs a mutate: section"),
    ({"mutate": {"base_width": {"choice": [8, 16]}}}, ["--scheduler", "pbt", "--num-samples", "2"],
     "mutate: base_width cannot change during a trial (an architecture setting: a copied checkpoint must fit"),
    ({"mutate": {"batch_size": {"choice": [100, 200]}}}, ["--scheduler", "pbt", "--num-samples", "2"],
     "mutate: batch_size cannot change during a trial (it defines the run"),
    ({"mutate": {"epochs": {"randint": [1, 3]}}}, ["--scheduler", "pbt", "--num-samples", "2"],
     "mutate: epochs cannot change during a trial (the search sets it for every trial)"),
    ({"mutate": {"lr": {"loguniform": [0.01, 0.1]}}}, ["--scheduler", "pbt"],
     "needs a population of at least 2 trials, got 1"),
    ({"mutate": {"lr": {"loguniform": [0.01, 0.1]}}}, ["--scheduler", "pbt", "--num-samples", "2",
                                                        "--perturbation-interval", "0"],
     "--perturbation-interval must be at least 1 and below --max-epochs 3"),
    ({"mutate": {"lr": {"loguniform": [0.01, 0.1]}}}, ["--scheduler", "pbt", "--num-samples", "2",
                                                        "--perturbation-interval", "3"],
     "--perturbation-interval must be at least 1 and below --max-epochs 3, got 3"),
    ({"mutate": {"label_smoothing": {"choice": [0.0, 0.1]}}}, ["--scheduler", "pb2", "--num-samples", "2"],
     "mutate: label_smoothing needs one of {uniform, loguniform, randint: ...} (--scheduler pb2)"),
    ({"mutate": {"lr": {"loguniform": [0.01, 0.1]}}}, ["--scheduler", "pbt", "--num-samples", "2",
                                                        "--max-concurrent", "1"],
     "--max-concurrent does not go with --scheduler pbt"),
    ({"mutate": {"label_smoothing": {"uniform": [0.0, 1.5]}}}, ["--scheduler", "pbt", "--num-samples", "2"],
     "label_smoothing=1.5: label_smoothing must be in [0, 1)"),
    ({"label_smoothing": {"choice": [0.0, 0.1]}, "mutate": {"label_smoothing": {"uniform": [0.0, 1.5]}}},
     ["--scheduler", "pbt", "--num-samples", "2"], "label_smoothing=1.5: label_smoothing must be in [0, 1)"),
    ({"mutate": {"lr": {"loguniform": [-0.1, 0.1]}}}, ["--scheduler", "pbt", "--num-samples", "2"],
     "lr loguniform needs positive bounds"),
    ({"mutate": {"preset": {"choice": ["seed2", "seed3"]}}}, ["--scheduler", "pbt", "--num-samples", "2"],
     "mutate: preset cannot change during a trial (an architecture setting"),
    ({"mutate": {"recipe": {"choice": ["default", "fast"]}}}, ["--scheduler", "pbt", "--num-samples", "2"],
     "mutate: recipe cannot change during a trial (it defines the run"),
    ({"mutate": {"lr": {"loguniform": [0.01, 0.1]}}}, ["--scheduler", "pbt", "--num-samples", "2",
                                                        "--quantile-fraction", "0.7"],
     "--quantile-fraction must be in (0, 0.5], got 0.7"),
    ({}, ["--trial-budget", "soon"], "--trial-budget 'soon' is not a duration"),
    ({"mutate": {"lr": {"loguniform": [0.01, 0.1]}}}, ["--scheduler", "pbt", "--num-samples", "2", "--trial-budget",
                                                        "1m"], "--trial-budget does not go with --scheduler pbt"),
])
def test_bad_input_one_line_before_any_trial(tmp_path, main_in_process, entries, extra, text):
    """Checked in this process: every one fails before Ray starts (nothing here may start it)."""
    from cifar_dist.search import cli

    out = tmp_path / "s"
    entries = dict(entries)
    tiny = entries.pop("tiny", True)
    code, err = main_in_process(cli.main, [*DATA, "--space", space(tmp_path, tiny=tiny, **entries), "--num-samples",
                                           "1", "--max-epochs", "3", "--output-dir", str(out), *extra])
    assert_one_line_error(code, err, text)
    assert not out.exists()
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize("states, text", [
    ([""], "experiment_state-2026-12-07_14-50-08.json cannot be read (it is empty); start the search again in "
           "another --output-dir"),
    (['{"trial_data": ['], "experiment_state-2026-12-07_14-50-08.json cannot be read (Expecting value"),
    (['{"runner_data": {}, "trial_data": []}'], "cannot be read (it holds no trials)"),
    (['{"runner_data": {}, "trial_data": [["t", "m"]]}', ""],  # an older session's state, whole
     "experiment_state-2026-12-07_14-50-09.json cannot be read (it is empty); move it aside to resume from the one before"),
    ([], "no Tune experiment state in"),
])
def test_a_search_whose_tune_state_is_damaged_is_not_resumed_and_not_started_anew(tmp_path, main_in_process,
                                                                                  states, text):
    """Ray, failing to read the newest state, would start the search anew in its folder (with trials of
    other settings beside the old ones): --resume refuses instead, with one line, before Ray starts."""
    from cifar_dist.search import cli

    out = tmp_path / "s"
    experiment = out / "ray" / "tune"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"tuner")
    for second, state in enumerate(states):
        (experiment / f"experiment_state-2026-12-07_14-50-{8 + second:02d}.json").write_text(state)
    before = sorted((p, p.read_bytes()) for p in out.rglob("*") if p.is_file())
    code, err = main_in_process(cli.main, [*DATA, "--space", space(tmp_path), "--num-samples", "1",
                                           "--output-dir", str(out), "--resume"])
    assert_one_line_error(code, err, text)
    assert f"cannot resume the search in {out} (nothing was changed)" in err
    assert sorted((p, p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    import ray

    assert not ray.is_initialized()


CPUS = os.cpu_count()  # what the local Ray gets


@pytest.mark.xdist_group("ray-b")
@pytest.mark.parametrize("extra, text", [
    (["--gpus-per-trial", "1"], "a trial needs 1 GPUs but the Ray cluster has 0"),
    # each trial fits (half the CPUs and its function's 0.1), two at once do not
    (["--scheduler", "pbt", "--num-samples", "2", "--workers-per-trial", "2", "--cpus-per-trial", f"{CPUS / 4:g}",
      "--max-epochs", "3"],
     f"--scheduler pbt with 2-worker trials runs the whole population at once: 2 trials need {CPUS + 0.2:g} CPUs, "
     f"the Ray cluster has {CPUS}"),
])
def test_a_search_larger_than_the_ray_cluster_is_one_line(tmp_path, extra, text):
    """The real command against the real (local) Ray it starts: asking for more than it has."""
    out = tmp_path / "s"
    start = time.time()
    sp = space(tmp_path, mutate={"lr": {"loguniform": [0.01, 0.1]}})
    r = search(["--space", sp, "--num-samples", "1", "--max-epochs", "1", "--output-dir", str(out), *extra], tmp_path,
               timeout=120)
    assert_one_line_error(r.returncode, r.stderr, text)
    assert not (out / "trials").exists()
    assert time.time() - start < 60


def test_a_ray_that_misses_its_start_up_deadline_is_started_again(monkeypatch, capsys):
    """Ray gives its raylet a fixed 30 s to register, which a busy 2-core machine has missed (the search
    then ended before it began). Here the first ray.init is made to fail as it did there, after starting
    a process of its own: that process is stopped, one line says what happened, and a real Ray starts."""
    import ray

    from cifar_dist.search import cli

    real, started = ray.init, []

    def first_fails(**kwargs):
        if not started:
            started.append(subprocess.Popen(["sleep", "300"]))  # what the failed start left running
            raise Exception("The current node timed out during startup. This could happen because ...")
        return real(**kwargs)

    monkeypatch.setattr(ray, "init", first_fails)
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a Ray of its own, as search() asks
    try:
        context = cli.init_ray(None, dict(num_cpus=1, include_dashboard=False, configure_logging=False))
        assert ray.is_initialized() and context.address_info["node_id"]
    finally:
        ray.shutdown()
    assert started[0].poll() is not None  # stopped, and reaped
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tune/search.py:")]  # (and Ray's)
    assert "the local Ray did not start within Ray's 30 s" in line and "starting it again" in line


def test_a_search_from_before_ray_dir_resumes_from_where_its_tuner_pkl_is(tmp_path):
    from cifar_dist.search.cli import tune_dir

    assert tune_dir(tmp_path) == tmp_path / "ray" / "tune"  # a search now: Ray's records under ray/
    (tmp_path / "tuner.pkl").write_bytes(b"")
    assert tune_dir(tmp_path) == tmp_path  # one from before keeps its own layout


def test_a_trial_whose_validation_loss_blew_up_is_listed_diverged_not_completed():
    from cifar_dist.search.report import trial_status

    assert trial_status(False, 3, 3, 14_449_786.0, 10) == "diverged (val loss 14,449,786)"
    assert trial_status(False, 3, 3, float("nan"), 10) == "diverged (val loss nan)"
    assert trial_status(False, 3, 3, 2.31, 10) == "completed"  # a hopeless lr: a uniform guess, not diverged
    assert trial_status(False, 1, 3, 0.9, 10) == "stopped early" and trial_status(True, 3, 3, 0.9, 10) == "failed"
    assert trial_status(False, 3, 3, 30.0, 100) == "completed"  # 10 x ln 100 = 46
