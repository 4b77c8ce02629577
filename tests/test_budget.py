"""Training to a deadline (--time-budget): the plan, its shortening on a slowed machine, its keeping on
resume. In this process (what is tested is the run's own clock, not a process's start)."""
import json
import os
import re
import time

import pytest

from cifar_dist import auto, budget, train
from cifar_dist.config import ConfigError, resolve
from cifar_dist.recipes import AUTO

from conftest import TINY, TINY_MODEL, accelerate_launch, assert_one_line_error, metrics, summary

pytestmark = pytest.mark.timeout(300)


def test_durations_read_as_people_write_them():
    assert [budget.parse_duration(t) for t in ("90s", "10m", "1h30m", "2.5m", "600", " 1H ")] == \
        [90, 600, 5400, 150, 600, 3600]
    for bad in ("ten minutes", "0s", "-5m", "5x", ""):
        with pytest.raises(ConfigError, match="time_budget"):
            budget.parse_duration(bad)


def test_evaluations_to_come_count_every_eval_every_epochs_and_the_last_part_epoch():
    assert budget.evaluations(0, 480, 20, 2) == 12  # 24 epochs, every second one
    assert budget.evaluations(0, 481, 20, 2) == 13  # and a 25th of one step, the last: evaluated
    assert budget.evaluations(20, 60, 20, 1) == 3  # at step 20 the first epoch's end is still to come
    assert budget.evaluations(21, 60, 20, 1) == 2
    assert budget.evaluations(30, 30, 20, 2) == 1  # ending now, half-way through epoch 2: its evaluation


def plan60():
    cfg = resolve([*TINY, "--eval-every", "2", "--tta", "none"])  # batch 100
    # 2,000 training images at 1,000/s: 20 steps of 0.1 s an epoch; 500 evaluated at a third of the cost: 1/6 s
    return cfg, budget.plan_steps(cfg, 60.0, spent_s=5.0, images_per_s=1000.0, train_images=2000, eval_images=500)


def cost(total, done=0):
    return (total - done) * 0.1 + budget.evaluations(done, total, 20, 2) / 6


def test_the_plan_is_the_most_steps_whose_training_evaluations_and_end_fit():
    cfg, plan = plan60()
    free = 60.0 - 5.0 - budget.reserve(60.0, plan.eval_s, budget.RESERVE_FRACTION)
    assert cost(plan.steps) <= free < cost(plan.steps + 1)
    assert plan.steps == plan.planned_steps == 498 and plan.epochs == 25 and plan.started_after_s == 5.0
    assert plan.step_s == 0.1 and plan.eval_s == pytest.approx(1 / 6, abs=0.01)
    assert "498 steps planned (24.9 epochs)" in plan.line() and "does not fit" not in plan.line()
    odd = budget.plan_steps(cfg, 61.0, spent_s=5.0, images_per_s=1000.0, train_images=2000, eval_images=500)
    assert odd.steps % 20 and odd.epochs == -(-odd.steps // 20)  # the last epoch a part of one
    tight = budget.plan_steps(cfg, 4.0, spent_s=5.0, images_per_s=1000.0, train_images=2000, eval_images=500)
    assert tight.steps == 1 and tight.epochs == 1  # nothing fits: still one step, evaluated
    assert "not even one step and an evaluation fit: it will run past the budget" in tight.line()


def test_the_plan_moves_to_the_pace_measured_behind_or_well_ahead():
    _, plan = plan60()
    free = 60 - 15.0 - budget.reserve(60, 1 / 6, budget.LATE_RESERVE_FRACTION)  # after 100 steps and 15 s
    assert budget.replan(plan, 100, spent_s=15.0, step_s=0.1, eval_s=1 / 6, eval_every=2) == "ahead of"
    assert cost(plan.steps, 100) <= free < cost(plan.steps + 1, 100) and plan.steps > 498  # the start's reserve
    assert budget.replan(plan, 120, spent_s=17.0, step_s=0.1, eval_s=1 / 6, eval_every=2) is None  # on pace
    assert budget.replan(plan, 200, spent_s=32.0, step_s=0.2, eval_s=1 / 6, eval_every=2) == "behind"
    free = 60 - 32.0 - budget.reserve(60, 1 / 6, budget.LATE_RESERVE_FRACTION)
    assert (plan.steps - 200) * 0.2 + budget.evaluations(200, plan.steps, 20, 2) / 6 <= free
    assert [c["after_step"] for c in plan.changes] == [100, 200] and plan.changes[-1]["steps"] == plan.steps
    assert budget.replan(plan, 250, spent_s=59.0, step_s=0.2, eval_s=1 / 6, eval_every=2) == "behind"
    assert plan.steps == 250 and plan.epochs == 13  # too late for more: it ends now, epoch 13 part-way
    _, close = plan60()
    assert budget.replan(close, 100, spent_s=16.4, step_s=0.1, eval_s=1 / 6, eval_every=2) is None  # a step ahead


def test_until_an_evaluation_is_measured_its_estimate_slows_with_the_steps():
    _, plan = plan60()
    assert budget.end_estimate(plan, plan.step_s * 3, None) == pytest.approx(plan.eval_s * 3)  # a busy machine
    assert budget.end_estimate(plan, plan.step_s / 2, None) == plan.eval_s  # faster: the plan's, not less
    assert budget.end_estimate(plan, plan.step_s * 3, 0.5) == 0.5  # measured: as measured
    # three times slower before any evaluation: the plan keeps three evaluations' time free for the end
    slow, slowed = plan60()[1], plan60()[1]
    budget.replan(slow, 100, 20.0, plan.step_s * 3, plan.eval_s, eval_every=2)
    budget.replan(slowed, 100, 20.0, plan.step_s * 3, budget.end_estimate(plan, plan.step_s * 3, None), eval_every=2)
    assert slowed.steps < slow.steps


BUDGETED = [*TINY, "--time-budget", "20s"]
SLOW = dict(CIFAR_DIST_SLOW_STEP="0.15")  # 20 steps an epoch: 3 s more an epoch than the plan measured
# 30 s, not 20: on a busy machine (the suite's other workers) the start-up took 8 of 20 s, and the first
# epoch's end its one-off costs (matplotlib), leaving too little to be measured at the end: 0.77x of it used
SLOWED = [*TINY, "--time-budget", "30s"]


def test_a_slowed_machine_shortens_the_plan_and_the_run_ends_evaluated_at_its_budget(tmp_path, in_process):
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = in_process(train.main, [*SLOWED, "--output-dir", str(out)], **SLOW)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    s, last = summary(out), metrics(out)[-1]
    plan = s["time_budget"]
    assert "time budget 30s: " in r.stdout and f"{plan['planned_steps']:,} steps planned" in r.stdout
    assert "time budget: behind the plan" in r.stdout  # the plan did not see the pauses
    assert plan["changes"] and plan["changes"][-1]["steps"] == plan["steps"] < plan["planned_steps"]
    assert last["step"] == plan["steps"] and s["epochs_completed"] == plan["epochs"] == last["epoch"]
    if plan["changes"][-1]["after_step"] < plan["steps"]:  # (unless the last look cut it to end at once)
        assert last["lr"] == pytest.approx(0.0, abs=1e-9)  # the schedule laid over the steps trained, to its end
    assert "test_acc" in last and (out / "checkpoints" / f"epoch-{plan['epochs']:04d}").is_dir()
    assert 0.8 * 30 <= plan["used_s"] <= 30 * 1.05 and elapsed <= 30 * 1.05 + 1  # the summary's clock; its write
    assert json.loads((out / "plan.json").read_text())["steps"] == plan["steps"]


def test_two_processes_keep_one_plan_and_end_it_together(tmp_path):
    """Every rank takes the main process's plan and its every change (they start moments apart, and a step
    is the plan's unit): a rank that ended a step early would leave the other waiting in an all-reduce."""
    out = tmp_path / "run"
    # 25 s: two processes' start-up (counted) took most of 15 s on a busy machine, and the run ran past to end
    # evaluated after its first steps, as it must
    r = accelerate_launch([*TINY_MODEL, "--lr", "0.05", "--log-every", "5", "--time-budget", "25s", "--output-dir",
                           str(out)], tmp_path, timeout=120, CIFAR_DIST_SLOW_STEP="0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    s, last = summary(out), metrics(out)[-1]
    plan = s["time_budget"]
    assert s["world_size"] == 2 and s["rank_weight_digests"][0] == s["rank_weight_digests"][1]
    assert "time budget: behind the plan" in r.stdout  # each change said once, by the main process
    assert plan["changes"] and r.stdout.count("time budget: ") == len(plan["changes"])
    assert last["step"] == plan["steps"] and "test_acc" in last and plan["used_s"] <= 25 * 1.05


def test_a_resumed_budgeted_run_keeps_its_plan(tmp_path, in_process):
    out = tmp_path / "run"
    first = in_process(train.main, [*BUDGETED, "--stop-after", "1", "--output-dir", str(out)])
    assert first.returncode == 0, first.stderr
    kept = json.loads((out / "plan.json").read_text())
    assert kept["steps"] > 20 and [m["epoch"] for m in metrics(out)] == [1]
    again = in_process(train.main, [*BUDGETED, "--output-dir", str(out)])
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "time budget: the plan kept" in again.stdout
    plan = summary(out)["time_budget"]
    assert plan["planned_steps"] == kept["planned_steps"] and plan["images_per_s"] == kept["images_per_s"]
    assert summary(out)["epochs_completed"] == plan["epochs"] == len(metrics(out))
    assert metrics(out)[-1]["step"] == plan["steps"]


@pytest.mark.parametrize("budget_arg, slurm, text", [
    ("soon", {}, "time_budget 'soon' is not a duration; write e.g. 90s, 10m or 1h30m"),
    ("slurm", {"SLURM_JOB_ID": None}, "time_budget slurm needs a SLURM job (SLURM_JOB_ID is not set)"),
    ("slurm-soon", {"SLURM_JOB_ID": "7"}, "time_budget 'soon' is not a duration"),
])
def test_a_bad_budget_is_one_line(tmp_path, main_in_process, budget_arg, slurm, text):
    code, err = main_in_process(train.main, [*TINY, "--time-budget", budget_arg, "--output-dir", str(tmp_path / "o")],
                                **slurm)
    assert_one_line_error(code, err, text)
    assert not (tmp_path / "o").exists()


def fake_squeue(tmp_path, monkeypatch, answer: str, code: int = 0) -> None:
    """squeue on PATH answering `answer` to `-h -j JOB -o %L` (what the local cluster's test checks for real)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "squeue").write_text(f"#!/bin/sh\n[ \"$*\" = \"-h -j 42 -o %L\" ] || exit 9\necho '{answer}'\nexit {code}\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")


@pytest.mark.parametrize("left, seconds", [("45:10", 2710), ("2:03:04", 7384), ("1-00:00:30", 86430)])
def test_a_slurm_budget_is_the_jobs_time_left_less_the_margin(tmp_path, monkeypatch, left, seconds):
    fake_squeue(tmp_path, monkeypatch, left)
    assert budget.slurm_time_left() == seconds
    margin = budget.parse_duration(budget.SLURM_MARGIN)
    assert budget.budget_seconds("slurm", age_s=7.0) == 7.0 + seconds - margin  # counted from the process's start
    assert budget.budget_seconds("slurm-30s", age_s=0.0) == seconds - 30


@pytest.mark.parametrize("left, code, text", [
    ("UNLIMITED", 0, "job 42 has no time limit squeue can tell ('UNLIMITED')"),
    ("", 1, "job 42 has no time limit squeue can tell"),
    ("2:00", 0, "the SLURM job has 120s left, not more than the 200s kept for its end"),
])
def test_a_slurm_budget_that_cannot_be_had_is_one_line(tmp_path, monkeypatch, left, code, text):
    fake_squeue(tmp_path, monkeypatch, left, code)
    with pytest.raises(ConfigError, match=re.escape(text)):
        budget.budget_seconds("slurm", age_s=0.0)


# --- --preset auto ----------------------------------------------------------------------------------

ROWS = [dict(candidate="quick", epochs=1, test_acc=0.80), dict(candidate="quick", epochs=2, test_acc=0.85),
        dict(candidate="fast", epochs=2, test_acc=0.88), dict(candidate="fast", epochs=4, test_acc=0.92)]


def test_auto_reads_accuracy_off_the_table_and_takes_the_most_accurate_that_fits():
    assert auto.expected_accuracy(ROWS, "fast", 3) == pytest.approx(0.90)  # between two rows
    assert auto.expected_accuracy(ROWS, "fast", 9) == 0.92  # never more than the most trained row
    assert auto.expected_accuracy(ROWS, "fast", 1) == pytest.approx(0.44)  # scaled down below the fewest
    assert auto.expected_accuracy(ROWS, "best", 5) is None

    def option(name, epochs, seconds, fits):
        return auto.Option(name, epochs, seconds, 1000.0, auto.expected_accuracy(ROWS, name, epochs), fits)

    short = [option("quick", 2, 100, True), option("fast", 1, 90, True)]
    assert auto.decide(short).name == "quick"  # 85 % beats fast's one epoch
    longer = [option("quick", 9, 500, True), option("fast", 4, 520, True)]
    assert auto.decide(longer).name == "fast"
    none = [option("quick", 1, 130, False), option("fast", 1, 200, False)]
    assert auto.decide(none).name == "quick"  # nothing fits: the quickest
    line = auto.line(auto.record(auto.decide(longer), longer, {"machine": "m"}))
    assert line == "preset auto: fast, 4 epochs, 92.0% expected on CIFAR-10 (not quick, 9 epochs, 85.0%)"


def test_auto_candidates_take_the_users_flags_and_keep_their_preset():
    cfg = resolve(auto.candidate_argv("quick", ["--preset", "auto", "--batch-size", "500", "--time-budget", "5m"]))
    assert cfg.preset == "fast" and cfg.model.widths == [32, 128, 128] and cfg.batch_size == 500
    assert cfg.lr == 53 and cfg.time_budget == "5m"


def test_auto_chooses_measures_and_keeps_its_choice_on_a_rerun(tmp_path, in_process):
    out = tmp_path / "run"
    args = ["--preset", "auto", "--time-budget", "30s", "--dataset", "synthetic", "--mixed-precision", "no",
            "--batch-size", "200", "--output-dir", str(out)]
    r = in_process(train.main, args)
    assert r.returncode == 0, r.stderr
    plan = json.loads((out / "plan.json").read_text())
    choice = plan["auto"]
    options = [auto.Option(**o) for o in choice["options"]]
    assert [o.name for o in options] == list(AUTO) and all(o.images_per_s > 0 for o in options)
    assert choice["chosen"] == auto.decide(options).name and choice["table_machine"]
    chosen = next(o for o in options if o.name == choice["chosen"])
    # the plan takes the rate measured for the choice, a moment later (the data loaded, the model built)
    assert 0.8 * chosen.epochs <= plan["planned_epochs"] <= 1.2 * chosen.epochs and auto.line(choice) in r.stdout
    assert plan["images_per_s"] == chosen.images_per_s and plan["budget_s"] == choice["budget_s"] == 30
    s = summary(out)
    assert s["time_budget"]["auto"] == choice and s["preset"] == "fast"
    assert s["config"]["model"]["widths"] == resolve(auto.candidate_argv(chosen.name, args)).model.widths
    assert s["config"]["batch_size"] == 200  # the user's flags win over a candidate's
    again = in_process(train.main, args)  # the choice kept (plan.json), so the finished run is this one
    assert again.returncode == 0 and "already finished" in again.stdout and "preset auto:" not in again.stdout


def test_auto_without_a_budget_or_outside_the_command_line_is_one_line(tmp_path, main_in_process):
    code, err = main_in_process(train.main, ["--preset", "auto", "--dataset", "synthetic", "--output-dir",
                                             str(tmp_path / "run")])
    assert_one_line_error(code, err, "preset auto chooses a training for a time budget: give --time-budget")
    with pytest.raises(ConfigError, match="preset auto is chosen by train.py's command line"):
        train.train(resolve(["--preset", "auto", "--time-budget", "1m", "--dataset", "synthetic"]))
