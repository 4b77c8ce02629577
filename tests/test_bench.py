"""bench/ scripts run end to end on small generated CIFAR-10 files (their figures come from real data;
here only their behaviour is checked: the tutorial baseline's pipeline, tables, results files, resume)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, env, write_bin

pytestmark = pytest.mark.timeout(300)


def bench(module: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    """`python -m bench.<module>`, as the README runs it (the repository on the path, here from elsewhere)."""
    return subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=cwd,
                          env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=280)


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
    r = bench("throughput", ["--data-dir", cifar, "--images", "300", "--rounds", "1", "--presets", "seed2",
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


def test_time_to_accuracy_reports_when_each_side_first_reached_the_target(cifar, tmp_path):
    # 40 % is four times chance: both loops must really learn the generated classes to get there
    r = bench("time_to_accuracy", ["--data-dir", cifar, "--target", "0.4", "--tutorial-epochs", "3",
                                   "--train-subset", "1000", "--test-subset", "200", "--results",
                                   str(tmp_path / "tta.jsonl"), "--", "--epochs", "3", "--batch-size", "100",
                                   "--lr", "0.05"], tmp_path)
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "tta.jsonl").read_text())
    runs = record["runs"]
    assert set(runs) == {"ours", "tutorial"} and "sooner" in r.stdout
    first = {k: next(m for m in v if m["test_acc"] >= 0.4) for k, v in runs.items()}  # each side reached it
    assert all(m["test_acc"] < 0.4 for k, v in runs.items() for m in v if m["epoch"] < first[k]["epoch"])
    assert record["speedup"] == pytest.approx(first["tutorial"]["elapsed"] / first["ours"]["elapsed"], rel=0.01)
