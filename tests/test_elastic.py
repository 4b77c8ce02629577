"""Elastic and reproducible runs, with real processes: a world size change mid-run (2 -> 1 and 1 -> 2
processes) trains the same global batches as one uninterrupted process and ends with the same weights
within the measured tolerance; a worker SIGKILLed under `--max-restarts` is restarted without a person;
`--deterministic` repeats every bit; a second run on a live run's directory is refused."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from cifar_dist import train

from conftest import (
    ROOT,
    TINY,
    accelerate_launch,
    env,
    free_port,
    kill_tree,
    metrics,
    summary,
    train_once,
    wait_for_file,
)

pytestmark = pytest.mark.timeout(300)

# 3 epochs of 20 global batches; a check-in (where a signal stops training) after every step
ELASTIC = [*TINY, "--sync-bn", "--epochs", "3", "--log-every", "1"]
# Relative L2 distance of all float tensors of model.pt (weights and BatchNorm statistics). Measured on
# these runs (AMD EPYC, AVX512): 2 processes with --sync-bn against 1 process 1.8e-3; the same 1-process
# run on 2 threads instead of 1 (float reduction order alone) 5.3e-3; 2 processes without --sync-bn 1.9e-2.
TOLERANCE = 1e-2


def trained_batches(trace: Path) -> dict[tuple[int, int], tuple[list[int], list[int]]]:
    """(epoch, global batch) -> the ids and pixel checksums of its images in position order (ranks in
    order), from every rank's $CIFAR_DIST_TRACE file; a batch trained twice would fail the assertion."""
    parts: dict[tuple[int, int], dict[int, tuple[list[int], list[int]]]] = {}
    for f in trace.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            ranks = parts.setdefault((r["epoch"], r["batch"]), {})
            ids, pixels = ranks.setdefault(r["rank"], ([], []))
            ids += r["ids"]
            pixels += r["pixels"]
    return {k: (sum((v[r][0] for r in sorted(v)), []), sum((v[r][1] for r in sorted(v)), []))
            for k, v in parts.items()}


def weights(out: Path) -> torch.Tensor:
    state = torch.load(out / "model.pt")
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def distance(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return float((wa - wb).norm() / wa.norm())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted 1-process run: its output and its trace."""
    tmp = tmp_path_factory.mktemp("one")
    train_once([*ELASTIC, "--output-dir", str(tmp / "run")], CIFAR_DIST_TRACE=str(tmp))
    return tmp / "run", tmp


def training_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes of a launch (not accelerate's launcher or torch elastic's agent, which a
    SIGUSR1 would kill)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    return [p for p in tree if "cifar_dist.train" in p.cmdline() or "LOCAL_RANK" in p.environ()]


def start(nproc: int, out: Path, trace: Path) -> subprocess.Popen:
    """A run on nproc processes (`python -m cifar_dist.train`, or `accelerate launch` for several)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "cifar_dist.train"]
        extra = {}
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(ROOT / "cifar_dist" / "train.py")]
        extra = {"ACCELERATE_USE_CPU": "1"}
    return subprocess.Popen([*cmd, *ELASTIC, "--output-dir", str(out)], cwd=trace, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(CIFAR_DIST_TRACE=str(trace), **extra))


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_another_world_size_resumes_the_same_batches_to_the_same_weights(tmp_path, one_process, first, then,
                                                                         in_process):
    """Stopped by a signal after epoch 1 (mid-epoch 2, wherever the signal lands) on `first` processes,
    resumed on `then`: every global batch of the run holds the same images, augmented alike, as in the
    uninterrupted 1-process run, each trained once; the weights agree within TOLERANCE."""
    ref, ref_trace = one_process
    out = tmp_path / "run"
    proc = start(first, out, tmp_path)
    assert wait_for_file(out / "checkpoints" / "epoch-0001", timeout=200, poll=0.02)
    for p in training_processes(proc):
        p.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by a signal" in stdout, stderr[-3000:]
    assert not (out / "summary.json").exists()
    if then == 1:
        r = in_process(train.main, [*ELASTIC, "--output-dir", str(out)], CIFAR_DIST_TRACE=str(tmp_path))
    else:
        r = accelerate_launch([*ELASTIC, "--output-dir", str(out)], tmp_path, nproc=then,
                              CIFAR_DIST_TRACE=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"saved by {first} process(es), resumed on {then}" in r.stdout

    resumed, reference = trained_batches(tmp_path), trained_batches(ref_trace)
    assert len(reference) == 60 and sorted(resumed) == sorted(reference)  # every batch once
    assert resumed == reference  # the same image ids and augmented pixels, batch by batch
    assert {json.loads(line)["world"] for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()} == {1, 2}
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]
    s = summary(out)
    assert s["world_size"] == then and len(s["resumes"]) == 1
    assert s["resumes"][0]["saved_by"] == first and s["resumes"][0]["world_size"] == then
    assert distance(ref, out) < TOLERANCE


@pytest.mark.parametrize("nproc", [2, 1])
def test_killed_worker_is_restarted_by_the_launcher_and_the_run_completes(tmp_path, nproc):
    """`python -m launcher --max-restarts 2`: the last rank SIGKILLed mid-epoch 2; torch elastic restarts the
    group, which resumes from epoch 1's checkpoint and finishes without anyone rerunning it, every epoch
    once. One process too (a SLURM job requeued onto one node keeps its --max-restarts)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher", "--nproc", str(nproc), "--max-restarts", "2", "--", *ELASTIC,
           "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_file(out / "checkpoints" / "epoch-0001", timeout=200, poll=0.02)
        victims = [p for p in training_processes(proc) if p.environ().get("LOCAL_RANK") == str(nproc - 1)]
        assert len(victims) == 1
        victims[0].kill()
        output, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0, output[-3000:]
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]
    s = summary(out)
    assert s["restarts"] == 1 and s["epochs_completed"] == 3
    assert [(r["epoch"], r["elastic_restart"]) for r in s["resumes"]] == [(1, 1)]
    assert output.count("done: test acc") == 1


def _global_bn_rank(rank: int, world: int, port: int, queue) -> None:
    """One rank of the GlobalBatchNorm check: its slice of the batch, DDP's average of the gradients."""
    import torch.distributed as dist

    from cifar_dist.distributed import sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, (x, y) = sync_batchnorm(_bn_net(), torch.device("cpu")), _bn_batch()
    n = len(y) // world
    torch.nn.functional.cross_entropy(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
    grads = [p.grad for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        queue.put(([g.numpy() for g in grads], [b.numpy() for b in model.buffers()]))
    dist.destroy_process_group()


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    conv = lambda cin, cout: torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return torch.nn.Sequential(conv(3, 8), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), conv(8, 8),
                               torch.nn.BatchNorm2d(8, momentum=0.4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 10))


def _bn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return 3 * torch.randn(64, 3, 8, 8, generator=g) + 1, torch.randint(0, 10, (64,), generator=g)


def test_global_batchnorm_on_two_processes_is_one_process_batchnorm():
    """GlobalBatchNorm (--sync-bn on CPUs) over 2 gloo processes, each with half the batch: the averaged
    gradients and the running statistics are one process's plain BatchNorm over the whole batch."""
    import torch.multiprocessing as mp

    model, (x, y) = _bn_net(), _bn_batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    ranks = [ctx.Process(target=_global_bn_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in ranks:
        p.start()
    grads, buffers = queue.get()
    for p in ranks:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in ranks)
    for want, got in zip([p.grad for p in model.parameters()], grads):
        assert torch.allclose(torch.from_numpy(got), want, rtol=1e-4, atol=1e-6)
    for want, got in zip(model.buffers(), buffers):
        assert torch.allclose(torch.from_numpy(got).to(want.dtype), want, rtol=1e-5, atol=1e-6)


def digest(out: Path) -> str:
    return hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()


def test_deterministic_twice_gives_identical_weights(tmp_path, one_process, train_here):
    """Two runs with --deterministic: deterministic algorithms on in the run (summary.json reads torch's own
    flag at the end; off in a run without it), and bit-identical weights."""
    args = [*TINY, "--epochs", "1", "--deterministic"]
    runs = [train_here([*args, "--output-dir", str(tmp_path / name)]) for name in ("a", "b")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert summary(tmp_path / "a")["deterministic_algorithms"] is True
    assert summary(one_process[0])["deterministic_algorithms"] is False


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under folder: size, modification time and content digest."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_on_a_live_runs_directory_is_refused_then_resumes_after_it_dies(tmp_path, train_here):
    """The first run holds the directory's lock (paused with SIGSTOP, so its files stand still while the
    second tries): the second is refused with one line and exit 2, changing nothing. Once the first is
    SIGKILLed, the OS releases the lock and the same command resumes the run."""
    out = tmp_path / "run"
    args = [*TINY, "--epochs", "4", "--output-dir", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "cifar_dist.train", *args], cwd=tmp_path, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_file(out / "checkpoints" / "epoch-0001", timeout=200, poll=0.02)
        first.send_signal(signal.SIGSTOP)
        before = snapshot(out)
        r = train_here(args)  # here: the lock is the other process's (an OS lock, released when it dies)
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and f"output dir {out} is in use by a live run (pid {first.pid} " in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        assert snapshot(out) == before
    finally:
        first.kill()
        first.wait()
    r = train_here(args)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3, 4]
