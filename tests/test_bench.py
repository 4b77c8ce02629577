"""bench/ scripts run end to end on small generated CIFAR-10 files (their figures come from real data;
here only their behaviour is checked: the tutorial baseline's pipeline, tables, results files, resume)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, env, run, write_bin

pytestmark = pytest.mark.timeout(300)


def bench(module: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    """`python -m bench.<module>`, as the README runs it (the repository on the path, here from elsewhere)."""
    return run([sys.executable, "-m", f"bench.{module}", *args], 280, cwd=cwd, env=env(PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Full-size files (the loaders insist on 10,000 records per file) of generated, learnable images."""
    root = tmp_path_factory.mktemp("cifar")
    write_bin(root / "cifar-10-batches-bin", n=10_000, learnable=True)
    return str(root)


def test_tutorial_baseline_uses_torchvision_pil_transforms(cifar):
    from bench import tutorial

    train, test = tutorial.loaders(cifar, train_subset=1000, test_subset=200)
    assert train.batch_size == 100 and len(train.dataset) == 1000 and len(test.dataset) == 200
    image, label = train.dataset[3]  # torchvision's own __getitem__: PIL image -> ToTensor -> Normalize
    raw = torch.from_numpy(train.dataset.data[3]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(tutorial.IMAGENET["mean"]), torch.tensor(tutorial.IMAGENET["std"])
    assert torch.allclose(image, (raw - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    assert label == train.dataset.targets[3]
    history = tutorial.run(cifar, epochs=2, train_subset=500, test_subset=100)
    assert [m["epoch"] for m in history] == [1, 2] and all(m["images_per_second"] > 0 for m in history)


def test_accuracy_bench_reports_seeds_reuses_finished_runs_and_refuses_other_settings(cifar, tmp_path):
    results = tmp_path / "acc.jsonl"
    args = ["--preset", "seed3", "--seeds", "2", "--out", str(tmp_path / "runs"), "--results", str(results),
            "--", *TINY, "--epochs", "1", "--test-subset", "100"]
    r = bench("accuracy", args, tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads(results.read_text())
    assert record["n"] == 2 and len(record["test_acc"]) == 2 and record["epochs"] == 1
    assert record["mean"] == pytest.approx(np.mean(record["test_acc"]), abs=0.01) and record["train_flops"] > 0
    assert "command" in record and "machine" in record and "± " in r.stdout
    again = bench("accuracy", args, tmp_path)  # finished seeds are read back, not retrained
    assert again.returncode == 0 and json.loads(results.read_text().splitlines()[1])["test_acc"] == record["test_acc"]
    other = bench("accuracy", [*args, "--lr", "0.01"], tmp_path)
    assert other.returncode == 2 and "other lr" in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_throughput_prints_and_records_the_ratio_the_presets_and_the_ceiling(cifar, tmp_path):
    r = bench("throughput", ["--data-dir", cifar, "--images", "300", "--test-images", "100", "--rounds", "1", "--presets", "seed2",
                             "--no-compile", "--ceiling-seconds", "0.5", "--results", str(tmp_path / "t.jsonl")],
              tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "t.jsonl").read_text())
    assert record["median_tutorial"] > 0 and record["median_ours"] > 0
    assert record["ratio"] == round(record["median_ours"] / record["median_tutorial"], 2)  # the recorded ratio
    assert f"{record['median_ours'] / record['median_tutorial']:.2f}x" in r.stdout  # is the printed one
    assert record["command"].startswith("python -m bench.throughput --data-dir")
    assert set(record["presets"][0]) == {"preset", "fp32", "bf16"}
    assert [row["batch"] for row in record["ceiling"]] == [100, 256] and record["ceiling"][0]["fp32"] > 0
    # bf16 measured, or not where the CPU emulates it (AVX2: its runs alone took over 4 minutes), and why
    skipped = record["bf16_not_measured"]
    assert (record["presets"][0]["bf16"] is None) == (record["ceiling"][0]["bf16"] is None) == bool(skipped)
    assert not skipped or f"bf16 not measured below: {skipped}" in r.stdout and "emulated" in skipped


def test_time_to_accuracy_reports_when_each_row_first_reached_its_target(cifar, tmp_path):
    # 40 % is four times chance: every loop must really learn the generated classes to get there
    small = "--preset seed3 --epochs 3 --batch-size 100 --lr 0.05 --mixed-precision no"
    r = bench("time_to_accuracy", ["--data-dir", cifar, "--target", "0.4", "--high-target", "0.45",
                                   "--tutorial-epochs", "3", "--train-subset", "1000", "--test-subset", "200",
                                   "--rows", "quick,tutorial,94", "--flags", "quick", small, "--flags", "94", f"{small} --bn-group 25",
                                   "--ceiling-seconds", "0.5", "--results", str(tmp_path / "tta.jsonl")], tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "tta.jsonl").read_text())
    rows = record["rows"]
    assert list(rows) == ["quick", "tutorial", "94"] and "sooner than the tutorial's loop" in r.stdout
    for name, target in (("quick", 0.4), ("tutorial", 0.4), ("94", 0.45)):  # each row reached its own target
        history = rows[name]["history"]
        first = next(m for m in history if m.get("test_acc", 0) >= target)
        assert all(m.get("test_acc", 0) < target for m in history if m["epoch"] < first["epoch"])
        assert rows[name]["seconds"] == pytest.approx(first["elapsed"])
    assert record["speedup"]["quick"] == pytest.approx(rows["tutorial"]["seconds"] / rows["quick"]["seconds"], rel=0.01)
    assert rows["94"]["gflops"] > 0 and rows["94"]["ideal_s"] > 0 and rows["quick"]["precision"] == "no"
    speed = rows["94"]["step_images_per_s"]  # the bare step at every micro-batch of whole groups; the bound at the best
    assert list(speed) == ["25", "50", "100"] and rows["94"]["micro_batch"] == int(max(speed, key=speed.get))
    # a 94 row that misses its target is still compared with the bound, over the epochs it trained
    missed = bench("time_to_accuracy", ["--data-dir", cifar, "--high-target", "1.0", "--train-subset", "100",
                                        "--test-subset", "100", "--rows", "94", "--flags", "94",
                                        f"{small} --epochs 1", "--ceiling-seconds", "0.3",
                                        "--results", str(tmp_path / "missed.jsonl")], tmp_path)
    assert missed.returncode == 0, missed.stderr
    row = json.loads((tmp_path / "missed.jsonl").read_text())["rows"]["94"]
    assert row["seconds"] is None and len(row["history"]) == 1 and row["ideal_s"] > 0
    assert f"{row['history'][0]['elapsed'] / row['ideal_s']:.2f}x" in missed.stdout and "never" in missed.stdout
    bad = bench("time_to_accuracy", ["--rows", "quick,fastest"], tmp_path)
    assert bad.returncode == 2 and "unknown row 'fastest'" in bad.stderr


def test_gpu_script_dry_run_writes_airbench_data_and_our_commands(cifar, tmp_path):
    """bench/gpu.sh and bench.reference without a GPU: what airbench will read, what we will run."""
    work = tmp_path / "work"
    r = run(["bash", str(ROOT / "bench" / "gpu.sh")], 280, cwd=ROOT,
            env=env(DRY_RUN="1", CIFAR10_DIR=cifar, OUT=str(tmp_path / "out"), WORK=str(work), RUNS="2"))
    assert r.returncode == 0, r.stderr
    train = torch.load(work / "94" / "cifar10" / "train.pt")
    test = torch.load(work / "94" / "cifar10" / "test.pt")
    assert train["images"].dtype == torch.uint8 and tuple(train["images"].shape) == (50_000, 32, 32, 3)
    assert tuple(test["images"].shape) == (10_000, 32, 32, 3) and test["labels"].dtype == torch.int64
    assert len(train["classes"]) == 10 and test["labels"].max() < 10
    ours = [line for line in r.stdout.splitlines() if line.startswith("accelerate launch")]
    assert len(ours) == 3 and all("cifar_dist/train.py --preset fast" in c for c in ours)  # warm-up + 2 seeds
    assert "--epochs 1" in ours[0] and "--seed 0" in ours[1] and "--seed 1" in ours[2]
    assert "--mixed_precision" not in r.stdout  # our precision is train.py's auto
    no_gpu = bench("reference", ["--data-dir", cifar], tmp_path)
    assert no_gpu.returncode == 2 and "airbench needs a CUDA GPU" in no_gpu.stderr


def test_airbench_table_is_read_from_its_final_row_with_or_without_its_header():
    from bench.reference import last_row

    run0 = ("---------------------------------------------------------------------------------\n"
            "|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |\n"
            "---------------------------------------------------------------------------------\n"
            "|       0  |      0  |      1.3027  |     0.5547  |   0.6258  |               |              0.6417  |\n"
            "|          |   eval  |      0.5990  |     0.9336  |   0.9392  |       0.9412  |              3.8512  |\n")
    run1 = "|       1  |      0  |      1.2900  |     0.5600  |   0.6300  |               |              0.6300  |\n" \
           "|          |   eval  |      0.5900  |     0.9300  |   0.9380  |       0.9399  |              3.8100  |\n"
    assert last_row(run0) == dict(acc=0.9412, seconds=3.8512)
    assert last_row(run1) == dict(acc=0.9399, seconds=3.81)  # airbench prints its header on run 0 only


def test_budget_bench_records_plan_epochs_wall_clock_and_accuracy(tmp_path):
    r = bench("budget", ["--budgets", "15s", "--results", str(tmp_path / "b.jsonl"), "--", *TINY], tmp_path)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads((tmp_path / "b.jsonl").read_text())["rows"]
    plan = row["plan"]  # epochs trained (metrics.jsonl's last step): the plan's, the last maybe a part of one
    assert row["budget_s"] == 15 and row["epochs"] == round(plan["steps"] / plan["steps_per_epoch"], 2)
    assert row["planned"] == plan["planned_epochs"] and row["changes"] == len(plan["changes"])
    assert row["training"] == "seed3"  # the preset (or, with --preset auto, its choice)
    assert row["vs_budget"] == f"{row['wall_s'] / 15:.3f}x" and 0 < row["test_acc"] <= 100
    assert "15s" in r.stdout and row["vs_budget"] in r.stdout


def test_auto_table_bench_writes_the_table_auto_reads_and_reuses_finished_runs(cifar, tmp_path):
    table, out = tmp_path / "auto_table.json", tmp_path / "runs"
    args = ["--data-dir", cifar, "--epochs", "quick=1", "--out", str(out), "--table", str(table), "--results",
            str(tmp_path / "auto.jsonl"), "--train-subset", "1000", "--test-subset", "200"]
    r = bench("auto", args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    written = json.loads(table.read_text())
    (row,) = written["rows"]
    assert row["candidate"] == "quick" and row["epochs"] == 1 and 0 < row["test_acc"] <= 1 and row["seconds"] > 0
    assert written["machine"] and written["command"].startswith("python -m bench.auto --data-dir")
    from cifar_dist.auto import expected_accuracy

    assert expected_accuracy(written["rows"], "quick", 1) == row["test_acc"]
    again = bench("auto", args, tmp_path)  # the finished run is read back, not trained again
    assert again.returncode == 0 and "cifar_dist.train" not in again.stdout
    assert json.loads(table.read_text())["rows"] == written["rows"]
