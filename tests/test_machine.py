"""What the machine gives a run (cifar_dist.machine): the CPU threads, and the precision `auto` chooses.
The decisions are tested with given timings; real `accelerate launch` runs show them reach the run."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from cifar_dist import machine
from cifar_dist.config import resolve

from conftest import ROOT, TINY_MODEL, env, free_port, run, summary

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("asked, device, gpu_bf16, speedup, want", [
    ("auto", "cpu", False, 1.6, "bf16"),  # an AVX512-BF16 EPYC
    ("auto", "cpu", False, 0.8, "no"),  # a Xeon with AVX512-BF16 but no AMX
    ("auto", "cpu", False, 0.1, "no"),  # AVX2 only: bf16 emulated
    ("auto", "cpu", False, 1.05, "no"),  # within a short probe's noise: fp32
    ("auto", "cuda", True, None, "bf16"),
    ("auto", "cuda", False, None, "fp16"),  # V100, T4: fp16 with Accelerate's gradient scaler
    ("no", "cpu", False, 1.6, "no"),
    ("bf16", "cpu", False, 0.8, "bf16"),  # explicit: kept
])
def test_precision_decision(asked, device, gpu_bf16, speedup, want):
    assert machine.choose_precision(asked, device, gpu_bf16, speedup)[0] == want


def test_explicit_bf16_where_it_is_slow_warns_with_the_factor_and_goes_on():
    precision, warning = machine.choose_precision("bf16", "cpu", False, 0.1)
    assert precision == "bf16" and "bf16 trains 10.0x slower than fp32" in warning and "\n" not in warning
    assert machine.choose_precision("bf16", "cpu", False, 0.6)[1] == ""  # 1.7x slower: under the 2x line
    assert machine.choose_precision("auto", "cpu", False, 0.1)[1] == ""  # auto chose fp32: nothing to warn


def test_threads_user_choice_else_cores_per_local_process(monkeypatch):
    cfg = resolve([])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(machine, "accelerate_launch", lambda: None)
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert machine.cpu_threads(cfg) == (4, "auto: 8 cores / 2 process(es)")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "6")  # a SLURM allocation that did not narrow the mask
    assert machine.cpu_threads(cfg) == (3, "auto: 6 cores (SLURM_CPUS_ON_NODE) / 2 process(es)")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert machine.cpu_threads(cfg) == (1, "auto: 2 cores (SLURM_CPUS_PER_TASK) / 2 process(es)")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # more than the mask allows: the mask
    assert machine.cpu_threads(cfg) == (4, "auto: 8 cores / 2 process(es)")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delenv("SLURM_CPUS_ON_NODE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set by the user (no launcher in between)
    assert machine.cpu_threads(cfg) == (3, "OMP_NUM_THREADS")

    def launched(args: list[str], launch_env: dict[str, str]) -> None:
        monkeypatch.setattr(machine, "accelerate_launch", lambda: (machine.launch_args(args), launch_env))

    # under accelerate launch, our OMP_NUM_THREADS=1 is its default unless its own environment had one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launched(["train.py", "--cpu-threads", "0"], {})
    assert machine.cpu_threads(cfg)[0] == 4
    launched(["train.py"], {"OMP_NUM_THREADS": "1"})
    assert machine.cpu_threads(cfg) == (1, "OMP_NUM_THREADS")
    launched(["--num_cpu_threads_per_process", "3", "train.py"], {})
    assert machine.cpu_threads(cfg) == (3, "accelerate launch --num_cpu_threads_per_process")
    cfg.cpu_threads = 5
    assert machine.cpu_threads(cfg) == (5, "--cpu-threads")


def test_launch_precision_only_when_accelerate_was_told(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    # not the accelerate config file of this machine's user
    monkeypatch.setattr("accelerate.commands.config.default_config_file", str(tmp_path / "none.yaml"))

    def launched(*args: str) -> None:
        monkeypatch.setattr(machine, "accelerate_launch", lambda: (machine.launch_args(list(args)), {}))

    launched("train.py")
    assert machine.launch_precision() is None  # Accelerate's default, not a choice
    launched("train.py", "--mixed-precision", "auto")  # train.py's own flag, not the launch's
    assert machine.launch_precision() is None
    launched("--mixed_precision", "no", "train.py")
    assert machine.launch_precision() == "no"
    launched("--mixed_precision=no", "train.py")
    assert machine.launch_precision() == "no"
    launched("--config_file", str(ROOT / "launcher" / "ddp.yaml"), "train.py")  # ours leave it to train.py
    assert machine.launch_precision() is None
    (tmp_path / "bf16.yaml").write_text("distributed_type: 'NO'\nmixed_precision: bf16\n")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    launched("--config_file", str(tmp_path / "bf16.yaml"), "train.py")
    assert machine.launch_precision() == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert machine.launch_precision() is None  # not launched by accelerate


def test_probe_is_measured_once_per_machine_and_model(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(tmp_path))
    cfg = resolve([*TINY_MODEL])
    first = machine.probe(cfg, processes=1)
    assert not first["cached"] and first["batch"] == 100
    assert first["speedup"] == pytest.approx(first["fp32_step_s"] / first["bf16_step_s"])
    again = machine.probe(cfg, processes=1)
    assert again["cached"] and again["speedup"] == first["speedup"]
    other = machine.probe(cfg, processes=2)  # another per-process batch: another measurement
    assert not other["cached"] and other["batch"] == 50
    assert len(json.loads(machine.cache_path().read_text())) == 2


@pytest.mark.parametrize("first_speedup, bn_group, timed", [
    (0.07, 0, [(16, machine.PROBE_FIRST_STEPS)]),  # emulated bf16 (an AVX2 EPYC: 0.07x at 16 images): the first look is the answer
    (0.9, 0, [(16, machine.PROBE_FIRST_STEPS), (100, machine.PROBE_STEPS)]),  # else the run's own batch is measured
    (1.6, 25, [(25, machine.PROBE_FIRST_STEPS), (100, machine.PROBE_STEPS)]),  # a first look of whole BatchNorm groups
])
def test_the_probe_ends_at_its_first_look_where_bf16_is_emulated(monkeypatch, first_speedup, bn_group, timed):
    calls = []

    def step_seconds(cfg, model, optimizer, batch, timed, clock=None):
        calls.append((batch, timed))
        speedup = first_speedup if len(calls) == 1 else 1.2
        return dict(fp32_step_s=1.0, bf16_step_s=1 / speedup, speedup=speedup, measured_batch=batch)

    monkeypatch.setattr(machine, "step_seconds", step_seconds)
    result = machine.measure(resolve([*TINY_MODEL, "--bn-group", str(bn_group)]), batch=100)
    assert calls == timed and result["measured_batch"] == timed[-1][0]


class Paced(torch.nn.Module):
    """A model whose step we set: each forward spends `fp32_s` of its thread's CPU time (`bf16_s` under bf16
    autocast), and every fp32 forward sleeps `pause_s` first: the time a busy machine's other processes
    take from it. Its own compute (one small linear layer) is a fraction of a millisecond."""

    def __init__(self, fp32_s: float, bf16_s: float, pause_s: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)
        self.fp32_s, self.bf16_s, self.pause_s = fp32_s, bf16_s, pause_s
        self.calls: list[tuple[str, int, int]] = []  # precision, batch, torch's threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf16 = torch.is_autocast_enabled("cpu")
        self.calls.append(("bf16" if bf16 else "fp32", len(x), torch.get_num_threads()))
        if not bf16:
            time.sleep(self.pause_s)
        end = time.thread_time() + (self.bf16_s if bf16 else self.fp32_s)
        while time.thread_time() < end:
            pass
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("bf16_s, emulated", [(0.08, True), (0.01, False)])
def test_the_probe_first_look_is_one_threads_cpu_time_that_load_does_not_lengthen(monkeypatch, bf16_s, emulated):
    # fp32 steps of 10 ms CPU, each 50 ms off the CPU: by the wall clock an emulated bf16 (80 ms) would read 0.75x
    model = Paced(fp32_s=0.01, bf16_s=bf16_s, pause_s=0.05)
    monkeypatch.setattr(machine, "build_model", lambda spec: model)
    threads = torch.get_num_threads()
    result = machine.measure(resolve([*TINY_MODEL]), batch=100)
    looked = [c for c in model.calls if c[1] == machine.PROBE_FIRST_BATCH]
    assert {c[2] for c in looked} == {1} and torch.get_num_threads() == threads  # one thread, then as before
    assert len(looked) == 2 * (1 + machine.PROBE_FIRST_STEPS)
    assert machine.emulated(result["speedup"]) is emulated
    assert result["measured_batch"] == (machine.PROBE_FIRST_BATCH if emulated else 100)
    if emulated:
        assert result["speedup"] == pytest.approx(0.125, rel=0.3) and len(looked) == len(model.calls)


def launch(args: list[str], cwd, nproc: int, **extra: str | None) -> subprocess.CompletedProcess:
    """`accelerate launch` as the README writes it: no precision flag, no thread count."""
    world = ["--multi_gpu", "--num_processes", str(nproc)] if nproc > 1 else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *world, "--main_process_port", str(free_port()),
           str(ROOT / "cifar_dist" / "train.py"), *args]
    return run(cmd, 240, cwd=cwd, env=env(ACCELERATE_USE_CPU="1", **extra))


def test_accelerate_launch_uses_every_core_and_chooses_the_precision(tmp_path):
    cores = len(os.sched_getaffinity(0))
    out = tmp_path / "one"
    r = launch([*TINY_MODEL, "--epochs", "1", "--output-dir", str(out)], tmp_path, 1, OMP_NUM_THREADS=None)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert s["cpu_threads"] == cores and f"with {cores} thread(s) each (auto: {cores} cores" in r.stdout
    probe = s["precision_probe"]
    assert probe["batch"] == 100 and probe["speedup"] > 0
    assert s["mixed_precision"] == machine.choose_precision("auto", "cpu", False, probe["speedup"])[0]
    assert f"precision: {s['mixed_precision']}" in r.stdout and "fp32's speed on this CPU" in r.stdout
    # Accelerate's "--mixed_precision was set to 'no'" answered in our line where we chose otherwise
    assert ("accelerate launch's 'no' above is its default" in r.stdout) is (s["mixed_precision"] != "no")


def test_two_processes_share_the_cores_and_take_the_main_process_probe(tmp_path):
    out = tmp_path / "two"
    r = launch([*TINY_MODEL, "--epochs", "1", "--output-dir", str(out)], tmp_path, 2, OMP_NUM_THREADS=None)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert s["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2) and s["world_size"] == 2
    assert s["precision_probe"]["batch"] == 50  # the per-process batch, probed once and broadcast
    assert s["mixed_precision"] == machine.choose_precision("auto", "cpu", False, s["precision_probe"]["speedup"])[0]


def test_accelerate_launch_is_recognised_as_users_type_it():
    assert machine.launch_start(["/usr/bin/python3", "/venv/bin/accelerate", "launch", "train.py"]) == 3
    assert machine.launch_start(["python", "-m", "accelerate.commands.launch", "--num_processes", "2"]) == 3
    assert machine.launch_start(["/usr/bin/python3", "/venv/bin/accelerate-launch", "train.py"]) == 2
    assert machine.launch_start(["python", "/venv/bin/accelerate", "config"]) is None
    assert machine.launch_start(["python", "-m", "cifar_dist.train", "launch"]) is None


def test_deterministic_kernels_name_an_op_without_one_in_one_line_once(capsys):
    """An op with no deterministic kernel (as torch alerts it: here a CUDA one's alert, raised by hand on
    this CPU machine) does not stop the run; one line names it, once. Off again restores torch's default."""
    import torch
    from torch._prims_common import alert_not_deterministic

    had_cublas = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    machine.use_deterministic_kernels(True)
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        alert_not_deterministic("median_cuda")
        alert_not_deterministic("median_cuda")
    finally:
        machine.use_deterministic_kernels(False)
        if not had_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    err = capsys.readouterr().err
    assert err.splitlines() == ["--deterministic: median_cuda has no deterministic kernel; results may differ "
                                "between runs"], err
