"""Shared helpers: the tiny-model arguments, running the real CLI in a subprocess, waiting for a file,
killing a process tree, writing small CIFAR-10 files."""
from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

# Two test workers share the two cores: one thread each, in process and in every subprocess (env()); a
# run takes an OMP_NUM_THREADS the user set as their choice (cifar_dist.machine.cpu_threads).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
# The precision probe's cache (cifar_dist.machine) of this test session, not the user's. (Not through
# XDG_CACHE_HOME: torch keeps its compiled extensions there, and DeepSpeed's would be rebuilt for minutes.)
os.environ["CIFAR_DIST_CACHE"] = tempfile.mkdtemp(prefix="cifar-dist-test-cache-")
atexit.register(shutil.rmtree, os.environ["CIFAR_DIST_CACHE"], ignore_errors=True)  # each pytest process its own

ROOT = Path(__file__).resolve().parents[1]
# A small model and the synthetic dataset keep a training run to seconds on 2 CPU cores.
TINY_MODEL = ["--dataset", "synthetic", "--stem-width", "8", "--widths", "8,16", "--blocks", "1,1",
              "--strides", "1,2", "--head", "gap", "--batch-size", "100"]
# fp32, whatever this CPU's bf16 speed: a test's result does not depend on the machine's precision probe
TINY = [*TINY_MODEL, "--lr", "0.05", "--log-every", "5", "--mixed-precision", "no"]
# What a budgeted run's end (its last evaluation, pictures, model.pt, summary) may take beyond what its plan
# kept free, beside the suite's other workers: a SLURM job used 15.1 s of a 14 s budget (11.4 of it start-up,
# the end 2.6 where the plan kept 1.3) and a Tune trial 21.6 of 20, on an AVX2 EPYC. A relative bound
# (5 %) of budgets this small is under a second.
BUDGET_END_UNDER_LOAD_S = 2.0


# Every test that waits on a process gives up on its own before pytest-timeout would kill it, with the
# child's last output in the failure: each wait below is cut to the time the test has left, less a margin.
MARGIN_S = 20
_deadline = [float("inf")]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The test's deadline: its timeout marker (or the ini's), from the start of its set-up, as
    pytest-timeout counts it."""
    if item.nodeid in _ungrouped:
        pytest.fail(f"pytest-xdist {version('pytest-xdist')} ignored this test's xdist_group under pytest "
                    f"{pytest.__version__}: install the versions pyproject.toml's dev extra allows", pytrace=False)
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else item.config.getini("timeout") or "inf")
    _deadline[0] = time.monotonic() + limit - MARGIN_S


# The modules whose tests run longest (Ray searches, a SLURM cluster, DeepSpeed, benchmarks), sent to the
# test workers first: the short tests then fill the gaps instead of the long ones ending the suite alone.
LONGEST_FIRST = ["test_tune", "test_slurm", "test_deepspeed", "test_bench", "test_elastic", "test_train"]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.module.__name__ if item.module else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's own order is kept
    # A module-scoped fixture is an expensive run that several tests only read. xdist gives each worker its
    # own, so the tests using one go to the same worker (a group), where it runs once, not once per worker.
    for item in items:
        defs = item._fixtureinfo.name2fixturedefs  # a Function: every item here is a test function
        shared = sorted(name for name, d in defs.items() if d[-1].scope == "module")
        if shared and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{','.join(shared)}"))


_ungrouped: set[str] = set()  # tests whose xdist_group pytest-xdist dropped (see below)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under --dist loadgroup, pytest-xdist sends a group to one worker by a suffix of each test's id
    (`...@group`). Under pytest 9.2 it could not set it (pytest keeps the id elsewhere now) and ignored
    the groups without a word: three SLURM clusters on the same ports at once, every shared run once per
    worker. Such a test fails at once instead, saying why (before its fixtures start anything)."""
    if getattr(session.config.option, "loadgroup", False):
        _ungrouped.update(item.nodeid for item in session.items
                          if item.get_closest_marker("xdist_group") and "@" not in item.nodeid)


def time_left(wanted: float) -> float:
    """`wanted` seconds, or what is left before the test's deadline if that is less."""
    return max(1.0, min(wanted, _deadline[0] - time.monotonic()))


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) that gives up after `timeout` seconds or at the
    test's deadline: the whole process tree is killed (a launcher's ranks, a search's Ray) and the test
    fails with the command and the last of its output, instead of being killed at the time limit."""
    limit = time_left(timeout)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"gave up after {limit:.0f}s: {' '.join(map(str, cmd))[:300]}\n--- its stdout, last lines:\n"
                    f"{(out or '')[-3000:]}\n--- its stderr, last lines:\n{(err or '')[-3000:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def env(**extra: str | None) -> dict[str, str]:
    """A clean environment for a subprocess; extra values of None unset a variable."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_", "SLURM_", "RAY_"))}
    e.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    e.update(extra)
    return {k: v for k, v in e.items() if v is not None}


def run_train(args: list[str], cwd: Path, timeout: int = 240, **extra: str) -> subprocess.CompletedProcess:
    """`python -m cifar_dist.train`, one thread (env): the other core runs the other test worker."""
    return run([sys.executable, "-m", "cifar_dist.train", *args], timeout, cwd=cwd, env=env(**extra))


def accelerate_launch(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300,
                      launch_flags: list[str] | None = None, **extra: str) -> subprocess.CompletedProcess:
    """A real multi-process CPU launch (gloo DDP): ACCELERATE_USE_CPU with --multi_gpu, as the README says."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", *(launch_flags or []), str(ROOT / "cifar_dist" / "train.py"), *args]
    return run(cmd, timeout, cwd=cwd, env=env(ACCELERATE_USE_CPU="1", **extra))


def wait_for_file(path: Path, timeout: float, poll: float = 0.05) -> bool:
    """Poll until `path` exists (a checkpoint being written by another process); False on timeout (or at
    the test's deadline)."""
    deadline = time.time() + time_left(timeout)
    while time.time() < deadline and not path.exists():
        time.sleep(poll)
    return path.exists()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant (accelerate's launcher, torchrun's agent and the ranks, or
    a search driver and the local Ray it started), as a preempted job would lose them; then reap them."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # it ended by itself meanwhile
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def learnable_splits(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """--dataset synthetic's generator (one smooth colour pattern per class, plus noise), as five training
    files and a test file of n images each: a net learns them, so an accuracy above chance is reachable."""
    from cifar_dist.data import synthetic

    train, test, _ = synthetic(5 * n, n)
    return [(s.images.numpy(), s.labels.numpy().astype(np.uint8))
            for s in (*(train.take(torch.arange(i * n, (i + 1) * n)) for i in range(5)), test)]


def write_bin(folder: Path, n: int = 20, learnable: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official binary layout, n records per file: label byte + R, G, B planes. Random pixels and
    labels, or (learnable) --dataset synthetic's images."""
    from cifar_dist.data import CLASSES

    folder.mkdir(parents=True)
    written = {}
    splits = learnable_splits(n) if learnable else [make_images(n, i) for i in range(6)]
    for name, (images, labels) in zip([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"], splits):
        rec = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
        (folder / f"{name}.bin").write_bytes(rec.tobytes())
        written[name] = (images, labels)
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n")
    return written


def write_py(folder: Path, n: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torchvision's python layout: pickled dicts with 'data' (N, 3072) and 'labels' (the official files'
    Python 2 str keys, as torchvision reads them)."""
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = make_images(n, 100 + i)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(n, -1), "labels": labels.tolist()}, f)
        written[name] = (images, labels)
    return written


@pytest.fixture
def in_process(capsys, monkeypatch):
    """Call a command's main(argv) in this process, for what is not about processes (bad input, a run whose
    being a process is not what is tested: no interpreter, torch and compiler start-up to pay again), with
    `environ` set meanwhile: returns what `run` returns. Accelerate's process-wide state is reset after
    each call, as a new process would have it, and after the test."""
    from accelerate.state import AcceleratorState

    def call(main, argv: list[str], **environ: str | None) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with monkeypatch.context() as m:  # the environment a subprocess of run() would get: env(**environ)
            wanted = env(**environ)
            for key in set(os.environ) - set(wanted):
                m.delenv(key)
            for key, value in wanted.items():
                m.setenv(key, value)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: exit 2 with its usage line
                code = e.code
            finally:
                AcceleratorState._reset_state(reset_partial_state=True)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([main.__module__, *argv], code, out, err)

    yield call
    AcceleratorState._reset_state(reset_partial_state=True)  # and after the test (it may call main itself)


def train_once(argv: list[str], **environ: str | None) -> None:
    """train.main(argv) in this process, for a run a module's tests share (a fixture of module scope, where
    in_process is not at hand), with the environment of env(**environ) meanwhile and Accelerate's process
    state reset after: a subprocess's start-up (interpreter, torch, its compiler's import) is not paid."""
    from accelerate.state import AcceleratorState

    from cifar_dist import train

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env(**environ))
    try:
        code = train.main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == 0, f"train.main({argv}) exited {code}"


@pytest.fixture
def main_in_process(in_process):
    """in_process, returning (exit code, stderr)."""
    def call(main, argv: list[str], **environ: str | None) -> tuple[int, str]:
        r = in_process(main, argv, **environ)
        return r.returncode, r.stderr

    return call


@pytest.fixture
def train_here(in_process):
    """train.py in this process: in_process(train.main, argv)."""
    from cifar_dist import train

    return lambda argv: in_process(train.main, argv)


def assert_one_line_error(code: int, stderr: str, text: str) -> None:
    """Exit 2, the text in an error line, and no traceback."""
    assert code == 2, stderr
    assert any(text in line for line in stderr.splitlines() if "error" in line.lower()), stderr
    assert "Traceback" not in stderr


@pytest.fixture
def tiny_args() -> list[str]:
    return list(TINY)


def write_cifar100(root: Path, layout: str, n_train: int, n_test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-100 in its binary layout (cifar-100-binary/: coarse label byte, fine label byte, R, G, B planes;
    fine_label_names.txt) or its python layout (cifar-100-python/: pickled dicts with 'data',
    'fine_labels', 'coarse_labels'; meta with 'fine_label_names'). Random pixels, fine labels 0..99."""
    rng = np.random.default_rng(100)
    names = [f"fine{i:02d}" for i in range(100)]
    folder = root / ("cifar-100-binary" if layout == "bin" else "cifar-100-python")
    folder.mkdir(parents=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = (np.arange(n) % 100).astype(np.uint8)
        rng.shuffle(fine)
        coarse = fine // 5
        if layout == "bin":
            rec = np.concatenate([coarse[:, None], fine[:, None], images.reshape(n, -1)], axis=1)
            (folder / f"{split}.bin").write_bytes(rec.tobytes())
        else:
            with open(folder / split, "wb") as f:
                pickle.dump({"data": images.reshape(n, -1), "fine_labels": fine.tolist(),
                             "coarse_labels": coarse.tolist()}, f)
        written[split] = (images, fine)
    if layout == "bin":
        (folder / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    else:
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": names, "coarse_label_names": [f"coarse{i}" for i in range(20)]}, f)
    return written
