"""Faults users meet on real clusters, on real files and a real (small) file system: a checkpoint cut
short or changed, a disk that fills up or turns read-only mid-run. Each costs at most the epoch since the
last good checkpoint, says so in one line, and the same command goes on once the fault is gone."""
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cifar_dist import train
from cifar_dist.rundir import MANIFEST, checkpoints, damage
from cifar_dist.search.storage import PARTIAL, whole_files

from conftest import TINY, metrics, summary, train_once

pytestmark = pytest.mark.timeout(300)
ARGS = [*TINY, "--epochs", "3", "--train-subset", "1000", "--test-subset", "200"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run uninterrupted, in this process: what every faulted run must end at."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_once([*ARGS, "--output-dir", str(out)])
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run (but .lock, which names the last process that took the directory)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def older(ckpt: Path) -> None:
    """A checkpoint as versions before the manifests wrote it, cut short."""
    (ckpt / MANIFEST).unlink()
    cut(ckpt / "model.safetensors")


DAMAGE = {"truncated": lambda c: cut(c / "model.safetensors"), "a changed byte": lambda c: flip(c / "optimizer.bin"),
          "truncated, no manifest": older}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_latest_checkpoint_costs_one_epoch_not_the_run(tmp_path, main_in_process, capsys, reference, how):
    out = tmp_path / "run"
    assert main_in_process(train.main, [*ARGS, "--stop-after", "2", "--output-dir", str(out)])[0] == 0
    latest = checkpoints(out)[-1]
    assert latest.name == "epoch-0002" and damage(latest) is None
    DAMAGE[how](latest)
    assert damage(latest) is not None
    damaged = snapshot(latest)
    assert train.main([*ARGS, "--output-dir", str(out)]) == 0  # (main_in_process resets Accelerate afterwards)
    moved = out / "checkpoints" / "damaged" / "epoch-0002"
    assert snapshot(moved) == damaged  # moved aside as it was, never deleted
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint ")]
    assert lines == [f"checkpoint {latest} is damaged ({damage(moved)}): moved to {moved}; resuming from "
                     f"{out}/checkpoints/epoch-0001"]
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]  # every epoch once: epoch 2 trained again
    assert summary(out)["resumes"][0]["epoch"] == 1
    assert summary(out)["rank_weight_digests"] == summary(reference)["rank_weight_digests"]


def test_damage_names_the_file_and_what_is_wrong(tmp_path, main_in_process):
    out = tmp_path / "run"
    assert main_in_process(train.main, [*ARGS, "--epochs", "1", "--output-dir", str(out)])[0] == 0
    (ckpt,) = checkpoints(out)
    size = (ckpt / "model.safetensors").stat().st_size
    cut(ckpt / "model.safetensors")
    assert damage(ckpt) == f"model.safetensors has {size // 2:,} of its {size:,} bytes"
    (ckpt / "model.safetensors").write_bytes(bytes(size))
    assert damage(ckpt) == "model.safetensors does not match its checksum"
    (ckpt / "model.safetensors").unlink()
    assert damage(ckpt) == "model.safetensors is missing"


def test_no_readable_checkpoint_is_one_line_exit_2_and_nothing_changed(tmp_path, main_in_process):
    out = tmp_path / "run"
    assert main_in_process(train.main, [*ARGS, "--stop-after", "2", "--output-dir", str(out)])[0] == 0
    for ckpt in checkpoints(out):
        cut(ckpt / "model.safetensors")
    before = snapshot(out)
    code, err = main_in_process(train.main, [*ARGS, "--output-dir", str(out)])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no readable checkpoint in" in err and "epoch-0002: model.safetensors has" in err
    assert "epoch-0001: model.safetensors has" in err
    assert snapshot(out) == before


# --- a real file system that fills up or turns read-only -------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (as root); elsewhere the test is skipped, saying why (never under CI)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        why = f"cannot mount a small tmpfs here (root only): {(r.stderr or r.stdout).strip()}"
        pytest.fail(why) if os.environ.get("CI") == "true" else pytest.skip(why)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the file system refuses: the disk is full."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError:
                pass
    return filler



@pytest.mark.parametrize("after, fails", [(1, "checkpoints/epoch-0002"), (3, "feature_maps/final/")])
def test_a_disk_that_fills_mid_run_stops_with_one_line_and_the_same_command_resumes(
        small_disk, main_in_process, monkeypatch, reference, after, fails):
    """The disk fills after epoch `after`: the next checkpoint, or (after the last epoch) the final
    pictures cannot be written. One line names the path and the system's reason; the last good checkpoint
    is kept, no half file is left; once there is room the same command ends where the uninterrupted run
    does. (A mount cannot turn read-only under a live run here: tmpfs refuses while files are open.)"""
    out, filler = small_disk / "run", []

    def at_epoch(metrics: dict, _checkpoint: Path) -> None:
        if metrics["epoch"] == after:
            filler.append(fill(small_disk))

    monkeypatch.setattr(train, "train", functools.partial(train.train, on_epoch=at_epoch))
    code, err = main_in_process(train.main, [*ARGS, "--output-dir", str(out)])
    lines = err.strip().splitlines()
    assert code == 4 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{out}/{fails}" in lines[0] and "No space left on device" in lines[0], lines[0]
    monkeypatch.undo()
    assert [c.name for c in checkpoints(out)] == [f"epoch-{e:04d}" for e in range(max(1, after - 1), after + 1)]
    assert all(damage(c) is None for c in checkpoints(out))
    assert not list(out.rglob("*.tmp")) and not (out / "summary.json").exists()
    assert [m["epoch"] for m in metrics(out)] == list(range(1, after + 1))
    filler[0].unlink()
    code, err = main_in_process(train.main, [*ARGS, "--output-dir", str(out)])
    assert code == 0, err
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]
    assert summary(out)["rank_weight_digests"] == summary(reference)["rank_weight_digests"]


OLD, NEW = '{"runner_data": {}, "trial_data": ["old"]}', '{"runner_data": {}, "trial_data": ["new"]}'  # Tune's, short


def test_a_search_killed_while_tune_writes_its_state_leaves_the_last_whole_file(tmp_path):
    """Tune's experiment state goes through search/storage.py: a writer killed mid-file (SIGKILL: a lost
    node) leaves the previous file whole beside a partial one, not a file cut short; a finished copy (as
    Tune's sync makes it, pyarrow.fs.copy_files) replaces it whole."""
    state = tmp_path / "experiment_state-1.json"
    state.write_text(OLD)
    writer = ("import sys, time\nfrom cifar_dist.search.storage import whole_files\n"
              "with whole_files().open_output_stream(sys.argv[1]) as f:\n"
              "    f.write(sys.argv[2].encode()); f.flush(); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(state), NEW[:37]], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        def written() -> list[Path]:
            return [p for p in tmp_path.glob(f"{state.name}{PARTIAL}*") if p.stat().st_size]

        while not (partial := written()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        assert partial and partial[0].read_bytes() == NEW[:37].encode()  # the new file, part written
    finally:
        proc.kill()
        proc.wait()
    assert state.read_text() == OLD  # never a part of the new one
    new = tmp_path / "staging" / state.name
    new.parent.mkdir()
    new.write_text(NEW)
    pafs.copy_files(str(new), str(state), destination_filesystem=whole_files())
    assert state.read_text() == NEW and state.stat().st_mode & 0o777 == new.stat().st_mode & 0o777


def test_an_experiment_state_tune_was_rewriting_when_uploaded_is_not_put_in_place(tmp_path):
    """Tune rewrites its staging copy of the state in place while its last upload may still be reading it
    (search/storage.py): an upload that read it empty or cut short (or holding no trials, which Ray cannot
    restore either) leaves the last whole state; a whole one replaces it, and every other file (the
    searcher's state is a pickle) goes in as read."""
    staging, experiment = tmp_path / "driver_artifacts", tmp_path / "ray" / "tune"
    staging.mkdir()
    experiment.mkdir(parents=True)
    state = experiment / "experiment_state-1.json"
    state.write_text(OLD)
    searcher = b"\x80\x05\x95 not JSON"
    (staging / "basic-variant-state-1.json").write_bytes(searcher)

    def upload(text: str) -> None:
        (staging / state.name).write_text(text)
        pafs.copy_files(str(staging), str(experiment), destination_filesystem=whole_files())

    for cut in ("", NEW[:30], '{"runner_data": {}, "trial_data": []}'):
        upload(cut)
        assert state.read_text() == OLD
        assert (experiment / "basic-variant-state-1.json").read_bytes() == searcher
        assert not list(experiment.glob(f"*{PARTIAL}*"))
    upload(NEW)
    assert state.read_text() == NEW
