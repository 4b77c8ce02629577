"""DeepSpeed ZeRO through Accelerate, 2 CPU processes (gloo), from the same train.py."""
import subprocess
import sys

import pytest

from conftest import (
    ROOT,
    TINY_MODEL,
    accelerate_launch,
    env,
    free_port,
    kill_tree,
    metrics,
    run,
    summary,
    wait_for_file,
)

pytestmark = pytest.mark.timeout(400)
FP32 = [*TINY_MODEL, "--mixed-precision", "no"]  # the launcher's configs leave the precision to train.py (auto)


def ds_cmd(config: str, args: list[str], nproc: int = 2) -> list[str]:
    # No ACCELERATE_USE_CPU here: it would silently turn DeepSpeed into plain DDP.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launcher" / config),
            "--num_processes", str(nproc), "--main_process_port", str(free_port()), str(ROOT / "cifar_dist" / "train.py"),
            *args]


def deepspeed_run(args, cwd, config="deepspeed-zero2.yaml", timeout=300, nproc=2):
    return run(ds_cmd(config, args, nproc), timeout, cwd=cwd, env=env())


# One uninterrupted ZeRO-2 run of 2 processes, read by the tests below (the reference a killed run must end at).
ZERO2 = [*FP32, "--epochs", "5"]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "ds"
    r = deepspeed_run([*ZERO2, "--output-dir", str(out)], out.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    # nothing compiled, even on a machine's first DeepSpeed run: DeepSpeed loads its shm_comm op (building it
    # with g++ the first time: 20 s alone, 3 minutes in a fresh machine's first suite) and says so, unless
    # cifar_dist.distributed (skip_inference_comm_op) marks it unavailable
    assert "shm_comm" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    return out


def test_zero2_two_processes_really_deepspeed_identical_weights_same_loss_as_ddp(zero2_run, tmp_path):
    out = zero2_run
    s = summary(out)
    assert s["world_size"] == 2 and s["engine"] == "DeepSpeedEngine" and s["distributed_type"].endswith("DEEPSPEED")
    assert s["rank_weight_digests"][0] == s["rank_weight_digests"][1]
    optim = sorted(p.name for p in (out / "checkpoints" / "epoch-0005").rglob("*optim_states.pt"))
    assert len(optim) == 2 and "zero_pp_rank_0" in optim[0] and "zero_pp_rank_1" in optim[1]  # ZeRO-partitioned
    ddp = tmp_path / "ddp"
    r = accelerate_launch([*ZERO2, "--output-dir", str(ddp)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(ddp)["engine"] == "DistributedDataParallel"
    # same seed, same data, same optimiser: the same losses (the first 2 epochs: ZeRO's reduction order drifts later)
    for a, b in list(zip(metrics(out), metrics(ddp)))[:2]:
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_killed_zero2_run_resumes_from_its_deepspeed_checkpoint(zero2_run, tmp_path):
    args, ref = [*ZERO2, "--output-dir"], zero2_run
    out = tmp_path / "run"
    proc = subprocess.Popen(ds_cmd("deepspeed-zero2.yaml", [*args, str(out)]), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    assert wait_for_file(out / "checkpoints" / "epoch-0002", timeout=200)
    kill_tree(proc)  # the launcher, torchrun's agent and both ranks (the agent starts ranks in new sessions)
    assert not (out / "summary.json").exists()
    # ZeRO's optimizer shards cannot be repartitioned: another world size is refused, the run untouched
    # every file of the run as it was (but .lock, which names the last process that took the directory)
    files = lambda: {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
                     if p.is_file() and p.name != ".lock"}
    before = files()
    r = deepspeed_run([*args, str(out)], tmp_path, nproc=1)
    errors = [line for line in r.stderr.splitlines() if line.startswith("cifar_dist.train: error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "was saved by 2 DeepSpeed processes and ZeRO cannot repartition its optimizer shards for 1" in errors[0]
    assert files() == before
    r = deepspeed_run([*args, str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert [m["epoch"] for m in metrics(out)] == list(range(1, 6))
    assert [m["train_loss"] for m in metrics(out)] == pytest.approx([m["train_loss"] for m in metrics(ref)], rel=1e-6)


def test_zero1_in_bf16_autocast_on_cpu(tmp_path):
    out = tmp_path / "run"
    # a few hundred images: bf16 is emulated on an AVX2 CPU, ~10x fp32's time (what is tested is the engine)
    r = deepspeed_run([*FP32, "--epochs", "1", "--train-subset", "400", "--test-subset", "100", "--output-dir", str(out),
                       "--mixed-precision", "bf16"], tmp_path, config="deepspeed-zero1.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(out)["engine"] == "DeepSpeedEngine" and summary(out)["mixed_precision"] == "bf16"


def test_zero2_offload_steps_the_recipes_own_optimizer(zero2_run, tmp_path):
    """Optimizer state on the CPU, stepped by the recipe's optimizer, not by the DeepSpeed CPU Adam that
    Accelerate puts in its place by default: the first epoch (of the same 5) has the ZeRO-2 run's loss."""
    out = tmp_path / "run"
    r = deepspeed_run([*ZERO2, "--stop-after", "1", "--output-dir", str(out)], tmp_path,
                      config="deepspeed-zero2-offload.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    optim = sorted(p.name for p in (out / "checkpoints" / "epoch-0001").rglob("*optim_states.pt"))
    assert len(optim) == 2 and "zero_pp_rank_1" in optim[1]  # DeepSpeed's partitioned state
    [offloaded] = metrics(out)
    assert offloaded["train_loss"] == pytest.approx(metrics(zero2_run)[0]["train_loss"], rel=1e-4)


def test_incompatible_accumulation_is_one_line(tmp_path):
    r = deepspeed_run([*FP32, "--grad-accum", "2", "--output-dir", str(tmp_path / "o")], tmp_path)
    assert r.returncode != 0
    assert "the DeepSpeed config has gradient_accumulation_steps 1 but --grad-accum is 2" in r.stderr


def test_deepspeed_missing_is_one_line(monkeypatch, capsys, tmp_path):
    from cifar_dist import distributed, train

    real = distributed.missing_modules
    assert real(("deepspeed", "transformers")) == []  # installed here: the patch below is what makes it missing
    monkeypatch.setattr(distributed, "missing_modules", lambda names: [n for n in names if n == "deepspeed"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert train.main([*FP32, "--output-dir", str(tmp_path / "o")]) == 2
    assert "DeepSpeed was asked for but deepspeed is not installed" in capsys.readouterr().err


def test_launcher_selects_deepspeed_without_the_cpu_trap(tmp_path):
    r = run([sys.executable, "-m", "launcher", "--dry-run", "--backend", "deepspeed-zero2", "--nproc", "2",
             "--", "--dataset", "synthetic"], 60, cwd=tmp_path, env=env())
    assert r.returncode == 0
    assert "ACCELERATE_USE_CPU" not in r.stdout and "--multi_gpu" not in r.stdout
    assert "launcher/deepspeed-zero2.yaml --num_processes 2" in r.stdout
