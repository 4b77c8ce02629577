"""The real CLI: outputs, resume after SIGKILL, bad input, divergence (in subprocesses where a process is\nwhat is tested: a kill, a signal, the real command's exit; in this process otherwise)."""
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cifar_dist import train

from conftest import (
    TINY,
    assert_one_line_error,
    env,
    metrics,
    run,
    run_train,
    summary,
    train_once,
    wait_for_file,
    write_bin,
)

pytestmark = pytest.mark.timeout(300)


def test_one_epoch_synthetic_run_writes_sane_results(tmp_path, tiny_args, train_here):
    out = tmp_path / "run"
    r = train_here([*tiny_args, "--epochs", "2", "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert "epoch   1/2 | train loss" in r.stdout and "img/s" in r.stdout
    rows = metrics(out)
    assert [m["epoch"] for m in rows] == [1, 2]
    for m in rows:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_second"):
            assert key in m and math.isfinite(m[key])  # present, not NaN, not infinite
        assert 0 <= m["test_acc"] <= 1 and m["images_per_second"] > 0
    assert rows[1]["test_acc"] > 0.3  # the synthetic classes are learnable: chance is 0.1
    s = summary(out)
    assert s["epochs_completed"] == 2 and s["world_size"] == 1 and s["test_acc"] == rows[1]["test_acc"]
    assert s["best_test_acc"] == max(m["test_acc"] for m in rows)
    assert s["params"] > 0 and s["model_bytes"] > 0 and s["mixed_precision"] == "no" and s["total_seconds"] > 0
    assert (out / "model.pt").is_file() and (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    # the saved config trains again as is: same run, already finished
    again = train_here(["--config", str(out / "config.yaml")])
    assert again.returncode == 0 and "already finished 2 epochs" in again.stdout
    assert metrics(out) == rows


def test_bf16_and_keep_last_checkpoints(tmp_path, tiny_args, train_here):
    out = tmp_path / "run"
    r = train_here([*tiny_args, "--epochs", "3", "--keep-checkpoints", "1", "--mixed-precision", "bf16",
                    "--train-subset", "500", "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert summary(out)["mixed_precision"] == "bf16"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0003"]


# Interrupted runs, resumed, end exactly where this uninterrupted one does (run once for all of them).
RESUMED = [*TINY, "--epochs", "4", "--log-every", "1", "--widths", "16,32", "--stem-width", "16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("reference") / "run"
    train_once([*RESUMED, "--output-dir", str(ref)])
    return ref


def test_sigkill_mid_training_then_rerun_resumes_exactly(tmp_path, reference, train_here):
    args, ref = RESUMED, reference
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cifar_dist.train", *args, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_file(out / "checkpoints" / "epoch-0002", timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "epoch-0002").exists() and not (out / "summary.json").exists()
    r = train_here([*args, "--output-dir", str(out)])  # the rerun: here (the process killed above is real)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    rows = metrics(out)
    assert [m["epoch"] for m in rows] == [1, 2, 3, 4]  # every epoch exactly once
    # the interrupted run ends exactly where the uninterrupted one does
    assert summary(out)["rank_weight_digests"] == summary(ref)["rank_weight_digests"]
    assert rows[-1]["test_acc"] == metrics(ref)[-1]["test_acc"]


def assert_cli_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert_one_line_error(r.returncode, r.stderr, text)


@pytest.mark.parametrize("args, text", [
    (["--preset", "resnet99"], "unknown preset 'resnet99'"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--lr", "nan"], "lr must be a positive number, got nan"),
    (["--widths", "8,16,32", "--blocks", "1,1"], "same length"),
    (["--blocks", "0,1,1"], "at least one block"),
    (["--batch-size", "5000"], "larger than the training set"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_input_one_line_exit_2(tmp_path, main_in_process, args, text):
    code, err = main_in_process(train.main, ["--dataset", "synthetic", "--output-dir", str(tmp_path / "o"), *args])
    assert_one_line_error(code, err, text)
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_bad_input_from_the_real_command(tmp_path):
    """The same, as a user meets it: a process whose exit code is 2 and whose stderr is one line."""
    r = run_train(["--dataset", "synthetic", "--batch-size", "5000", "--output-dir", str(tmp_path / "o")], tmp_path)
    assert_cli_error(r, "batch_size 5000 is larger than the training set (2000 images)")
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1


def test_missing_and_truncated_data(tmp_path, main_in_process):
    out = ["--output-dir", str(tmp_path / "o")]
    assert_one_line_error(*main_in_process(train.main, ["--data-dir", str(tmp_path / "nowhere"), *out]),
                          "no CIFAR-10 in")
    write_bin(tmp_path / "d" / "cifar-10-batches-bin", n=3)
    assert_one_line_error(*main_in_process(train.main, ["--data-dir", str(tmp_path / "d"), *out]),
                          "data_batch_1.bin has 9219 bytes, expected 30730000")
    assert_one_line_error(*main_in_process(train.main, out, CIFAR10_DIR=str(tmp_path / "d")),
                          "data_batch_1.bin has 9219 bytes")  # $CIFAR10_DIR is the default


# In this process: refusing, resuming and stopping are about the run directory, not about processes.

def test_output_path_that_is_a_file_is_refused_untouched(tmp_path, tiny_args, main_in_process):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    assert_one_line_error(*main_in_process(train.main, [*tiny_args, "--output-dir", str(target)]), "is a file")
    assert target.read_text() == "precious"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "metrics.jsonl").write_text("mine\n")
    assert_one_line_error(*main_in_process(train.main, [*tiny_args, "--output-dir", str(other)]),
                          "holds no cifar-dist run")
    assert (other / "metrics.jsonl").read_text() == "mine\n"


def test_a_run_saved_before_a_setting_existed_is_still_the_same_run(tmp_path):
    """A run directory from an older version lacks the settings added since: they count as their defaults
    (the behaviour it had), so its rerun resumes instead of being refused as another run."""
    from cifar_dist.config import IDENTITY, resolve, save_yaml, to_dict
    from cifar_dist.rundir import saved_differences

    cfg = resolve(["--preset", "seed3"])
    save_yaml(cfg, tmp_path / "config.yaml")
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del old["test_fraction"], old["skip_bad_images"], old["model"]["bn_group"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert saved_differences(tmp_path, to_dict(cfg), IDENTITY) == []
    assert saved_differences(tmp_path, to_dict(resolve(["--preset", "seed3", "--test-fraction", "0.3"])),
                             IDENTITY) == ["test_fraction"]


def test_other_architecture_or_dataset_in_a_run_dir_is_refused(tmp_path, tiny_args, main_in_process):
    out = tmp_path / "run"
    assert main_in_process(train.main, [*tiny_args, "--epochs", "1", "--output-dir", str(out)])[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = main_in_process(train.main, [*tiny_args, "--widths", "8,32", "--epochs", "2", "--output-dir", str(out)])
    assert_one_line_error(code, err, "holds a run with another model")
    code, err = main_in_process(train.main, [*tiny_args, "--dataset", "cifar10", "--epochs", "2",
                                             "--output-dir", str(out)])
    assert_one_line_error(code, err, "another dataset")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_args, main_in_process):
    out = tmp_path / "run"
    assert main_in_process(train.main, [*tiny_args, "--epochs", "1", "--output-dir", str(out)])[0] == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["model"]["widths"] = [8, 32]  # someone edited the saved config: the checkpoint no longer fits
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = main_in_process(train.main, ["--config", str(out / "config.yaml"), "--epochs", "2"])
    assert_one_line_error(code, err, "does not fit this run")
    assert (out / "checkpoints" / "epoch-0001").is_dir() and len(metrics(out)) == 1


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_args, main_in_process):
    out = tmp_path / "run"
    assert main_in_process(train.main, [*tiny_args, "--epochs", "1", "--output-dir", str(out)])[0] == 0
    # a new lr is not part of the run's identity, so this resumes epoch 1 and then blows up
    code, err = main_in_process(train.main, [*tiny_args, "--epochs", "3", "--lr", "1e30", "--output-dir", str(out)])
    assert code == 3, err
    assert "training loss is nan" in err.lower() or "training loss is inf" in err.lower()
    assert "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001"]
    assert [m["epoch"] for m in metrics(out)] == [1]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_a_rerun_resumes_to_the_same_result(tmp_path, reference, sig, train_here):
    """A signal mid-epoch (log-every 1: the next step): a mid-epoch checkpoint, and the rerun ends exactly
    where the uninterrupted run does."""
    args, ref = RESUMED, reference
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cifar_dist.train", *args, "--output-dir", str(out)],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_file(out / "checkpoints" / "epoch-0002", timeout=120, poll=0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by a signal" in stdout and not (out / "summary.json").exists()
    r = train_here([*args, "--output-dir", str(out)])
    assert r.returncode == 0 and "resumed from" in r.stdout
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3, 4]
    assert [m["train_loss"] for m in metrics(out)] == [m["train_loss"] for m in metrics(ref)]
    assert summary(out)["rank_weight_digests"] == summary(ref)["rank_weight_digests"]


@pytest.mark.timeout(600)
def test_compiled_run_matches_eager_and_its_checkpoints_load_without_compile(tmp_path, tiny_args):
    """--compile changes speed, not results: the same seed gives the same weights (up to float rounding),
    model.pt has the plain module's names, and a checkpoint written by a compiled run resumes eagerly."""
    args = [*tiny_args, "--train-subset", "600", "--test-subset", "200"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    r = run_train([*args, "--epochs", "1", "--output-dir", str(eager)], tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_train([*args, "--epochs", "1", "--compile", "--output-dir", str(compiled)], tmp_path, timeout=500)
    assert r.returncode == 0, r.stderr
    assert summary(compiled)["config"]["compile"] is True
    a, b = (torch.load(out / "model.pt", weights_only=True) for out in (eager, compiled))
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:  # compiled kernels round differently and 6 steps amplify it: < 2 % per tensor, measured
        if a[k].is_floating_point():  # <= 0.7 %; another seed differs by ~100 % in every weight
            assert (a[k] - b[k]).norm() <= 0.02 * a[k].norm() + 1e-6, k
    assert any(not torch.equal(a[k], b[k]) for k in a)  # compiled kernels did run (eager would be bit-identical)
    assert len(list((compiled / "feature_maps" / "final").glob("*.png"))) == 3  # hooks still see the layers
    r = run_train([*args, "--epochs", "2", "--no-compile", "--output-dir", str(compiled)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and [m["epoch"] for m in metrics(compiled)] == [1, 2]


def test_a_run_logged_to_a_file_shows_progress_lines_between_epoch_lines(tmp_path, tiny_args):
    """Output to a file (a job log): no bar, and plain progress lines about every tenth of an epoch (here
    without the few seconds' spacing, --progress-seconds 0), between the epoch lines."""
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-m", "cifar_dist.train", *tiny_args, "--epochs", "2", "--progress-seconds",
                            "0", "--output-dir", str(tmp_path / "run")], cwd=tmp_path, env=env(), stdout=f,
                           stderr=subprocess.STDOUT, timeout=240)
    assert r.returncode == 0, log.read_text()[-2000:]
    lines = log.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("epoch   1/2 |"))
    second = next(i for i, line in enumerate(lines) if line.startswith("epoch   2/2 |"))
    between = [line for line in lines[first:second] if line.startswith("  epoch 2/2 step ")]
    assert len(between) == 9  # 20 steps: every 2nd but the last
    assert all("| loss " in line and " img/s | " in line and "s left in the epoch" in line for line in between)
    assert "\r" not in log.read_text()  # no progress bar in a file


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_a_short_cifar100_run_trains_and_writes_readable_pictures(tmp_path, tiny_args, layout, train_here):
    """Full-size generated CIFAR-100 files (the loaders insist on the official record counts), a subset
    trained: the model has 100 outputs, every picture is written, the confusion matrix in its 100-class form."""
    from PIL import Image

    from conftest import write_cifar100

    write_cifar100(tmp_path / "c100", layout, 50000, 10000)
    out = tmp_path / "run"
    r = train_here([*tiny_args, "--dataset", "cifar100", "--data-dir", str(tmp_path / "c100"), "--train-subset",
                    "1000", "--test-subset", "500", "--epochs", "1", "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    s = summary(out)
    assert s["config"]["dataset"] == "cifar100" and s["config"]["model"]["num_classes"] == 100
    assert s["classes"] == [f"fine{i:02d}" for i in range(100)] and len(s["per_class_test_acc"]) == 100
    for picture in ("samples.png", "confusion_matrix.png", "curves.png"):
        assert (out / picture).stat().st_size > 10_000, picture
    assert Image.open(out / "confusion_matrix.png").size[0] > 2000  # the wide 100-class form, beside the sorted bars
    assert "cifar100: 1,000 training images" in (out / "model_card.md").read_text()


def test_a_run_without_deepspeed_does_not_import_it(tmp_path):
    """DeepSpeed installed but not asked for: not imported (a CPU-second of start-up; Accelerate's unwrap_model
    imported it to look for its engine) and its "Setting accelerator to CPU" line is not printed."""
    code = (f"import sys; from cifar_dist import train; sys.exit(train.main({[*TINY, '--epochs', '1', '--output-dir', str(tmp_path / 'o')]!r})"
            " or 10 * ('deepspeed' in sys.modules))")
    r = run([sys.executable, "-c", code], 120, cwd=tmp_path, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Setting accelerator" not in r.stdout + r.stderr
