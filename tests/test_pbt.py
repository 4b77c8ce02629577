"""What PBT leaves behind, without Ray: a trial's schedule of settings rebuilt from the trials' journals,
its replay as train.py commands (--stop-after, then a resume with the new settings), and what a mutated
lr means (the schedule's peak scales, the position on it is kept). The search itself: test_tune.py."""
import threading
import time
from pathlib import Path

import pytest

from cifar_dist import train
from cifar_dist.config import resolve, save_yaml
from cifar_dist.rundir import held, take_lock
from cifar_dist.search import trial
from cifar_dist.search.report import replay_commands, schedule, write_replay
from cifar_dist.search.schedulers import make_scheduler
from cifar_dist.search.trial import retried, wait_for_previous_run

from conftest import TINY, env, metrics, run, summary

pytestmark = pytest.mark.timeout(300)
ARCH = {"stages": 2, "base_width": 8}


def journal_of(*events):
    return [dict(event=kind, **fields) for kind, fields in events]


def chain():
    """a trains on its own; b copies a's epoch-2 checkpoint (lr perturbed to 0.06); c copies b's epoch-3
    checkpoint (0.072); d copies a with no change at all."""
    a0, b0 = {**ARCH, "lr": 0.05}, {**ARCH, "lr": 1e-5}
    b1, c1 = {**ARCH, "lr": 0.06}, {**ARCH, "lr": 0.072}
    report = lambda epoch, k=0: ("report", dict(epoch=epoch, exploits=k))  # noqa: E731
    return {
        "a": journal_of(("start", dict(params=a0, exploits=0)), *(report(e) for e in (1, 2, 3, 4))),
        "b": journal_of(("start", dict(params=b0, exploits=0)), report(1), report(2),
                        ("exploit", dict(epoch=2, donor="a", donor_epoch=2, donor_exploits=0, before=b0, donor_params=a0,
                                         after=b1)),
                        ("start", dict(params=b1, exploits=1)), report(3, 1), report(4, 1)),
        "c": journal_of(("start", dict(params=b0, exploits=0)), report(1), report(2), report(3),
                        ("exploit", dict(epoch=3, donor="b", donor_epoch=3, donor_exploits=1, before=b0, donor_params=b1,
                                         after=c1)),
                        ("start", dict(params=c1, exploits=1)), report(4, 1)),
        "d": journal_of(("start", dict(params=b0, exploits=0)), report(1),
                        ("exploit", dict(epoch=1, donor="a", donor_epoch=1, donor_exploits=0, before=b0, donor_params=a0,
                                         after=a0)),
                        ("start", dict(params=a0, exploits=1)), report(2, 1)),
    }


def test_a_trials_schedule_follows_its_donors_back_to_the_first_settings():
    events = chain()
    assert schedule(events, "a") == [(0, events["a"][0]["params"])]
    assert schedule(events, "c") == [(0, {**ARCH, "lr": 0.05}), (2, {**ARCH, "lr": 0.06}), (3, {**ARCH, "lr": 0.072})]
    assert schedule(events, "d") == [(0, {**ARCH, "lr": 0.05})]  # a copy without a change is one config


def test_a_retried_exploit_is_not_a_second_exploit():
    a2 = {"trial": "a", "epoch": 2, "exploits": 0}
    assert retried(chain()["b"][:4], a2)  # b's exploit, then b failed before it reported on a's weights
    assert retried(chain()["b"], a2)  # or it reported since, and a resumed search rolled it back to the copy
    assert not retried(chain()["b"], {**a2, "epoch": 4})  # a's newer checkpoint: a new exploit
    assert not retried(chain()["c"], {"trial": "a", "epoch": 3, "exploits": 0})  # another donor than the last
    assert not retried(chain()["a"], a2)  # a never copied anything


def test_a_restarted_trial_waits_for_its_previous_runs_lock(tmp_path, monkeypatch):
    """Until the old run's lock is released (here after 1 s), and no longer than PREVIOUS_RUN_S."""
    assert not held(tmp_path)  # no lock file
    handle, _ = take_lock(tmp_path)
    assert held(tmp_path)
    monkeypatch.setattr(trial, "PREVIOUS_RUN_S", 0.5)
    with pytest.raises(RuntimeError, match="did not end in 0.5s"):
        wait_for_previous_run(tmp_path)
    monkeypatch.setattr(trial, "PREVIOUS_RUN_S", 30)
    threading.Timer(1, handle.close).start()
    start = time.monotonic()
    wait_for_previous_run(tmp_path)
    assert 0.9 < time.monotonic() - start < 10 and not held(tmp_path)


@pytest.mark.parametrize("scheduler", ["pbt", "pb2"])
def test_explore_keeps_ranges_inside_their_bounds(scheduler):
    """The scheduler's own explore step (Ray's, then ours): whatever it draws stays a valid setting."""
    mutations = {"lr": {"loguniform": [0.01, 0.1]}, "cutout": {"randint": [0, 9]}}
    if scheduler == "pbt":
        mutations["tta"] = {"choice": ["none", "flip"]}
    explore = make_scheduler(scheduler, 6, mutations)._custom_explore_fn
    assert explore({"lr": 0.12, "cutout": 11, "tta": "flip"}) == {"lr": 0.1, "cutout": 8, "tta": "flip"}
    assert explore({"lr": 0.005, "cutout": 3.4, "tta": "none"}) == {"lr": 0.01, "cutout": 3, "tta": "none"}


def test_replay_flags_spell_every_kind_of_setting():
    segments = [(0, {"lr": 0.1, "nesterov": True, "tta": "flip"}), (2, {"lr": 0.1, "nesterov": False, "tta": "none"}),
                (4, {"lr": 0.08, "nesterov": True, "tta": "none"})]
    commands = replay_commands(segments, Path("best.yaml"))
    assert commands == [["--config", "best.yaml", "--stop-after", "2"],
                        ["--config", "best.yaml", "--no-nesterov", "--tta", "none", "--stop-after", "4"],
                        ["--config", "best.yaml", "--lr", "0.08", "--tta", "none"]]
    for args in commands:  # each parses as train.py flags
        resolve([*TINY, *args[2:]])


def test_the_replay_script_trains_the_schedule_and_a_mutated_lr_keeps_its_place(tmp_path, main_in_process):
    """best-replay.sh of c's schedule, run for real: epochs 1-2 at lr 0.05, epoch 3 at 0.06, epoch 4 at
    0.072, each a resume of the checkpoint before. Against an uninterrupted run at 0.05, the lr at the end
    of every epoch is that run's, scaled by the new peak: the position on the schedule is kept."""
    base = [*TINY, "--epochs", "4", "--lr-end", "0.5", "--train-subset", "600", "--test-subset", "200"]
    save_yaml(resolve(base), tmp_path / "best.yaml")
    ref = tmp_path / "ref"
    assert main_in_process(train.main, ["--config", str(tmp_path / "best.yaml"), "--output-dir", str(ref)])[0] == 0
    commands = replay_commands([(0, {"lr": 0.05}), (2, {"lr": 0.06}), (3, {"lr": 0.072})], tmp_path / "best.yaml")
    assert [c[2:] for c in commands] == [["--stop-after", "2"], ["--lr", "0.06", "--stop-after", "3"], ["--lr", "0.072"]]
    write_replay(commands, tmp_path / "best-replay.sh", "c")
    out = tmp_path / "replayed"
    r = run(["bash", str(tmp_path / "best-replay.sh"), str(out)], 240, cwd=tmp_path, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("stopped after epoch") == 2 and r.stdout.count("resumed from") == 2
    got, want = metrics(out), metrics(ref)
    assert [m["epoch"] for m in got] == [1, 2, 3, 4]
    assert [m["train_loss"] for m in got[:2]] == [m["train_loss"] for m in want[:2]]  # the same run up to the change
    for m, w, peak in zip(got, want, (0.05, 0.05, 0.06, 0.072)):
        assert m["lr"] == pytest.approx(w["lr"] * peak / 0.05, rel=1e-9)
    s = summary(out)
    assert [(x["epoch"], x["batch"]) for x in s["resumes"]] == [(2, 0), (3, 0)]
    assert s["config"]["lr"] == 0.072 and s["config"]["stop_after"] == 0


def test_stop_after_is_checked(tmp_path, main_in_process):
    code, err = main_in_process(train.main, [*TINY, "--stop-after", "-1", "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "stop_after must be >= 0, got -1" in err
