"""The launcher, and slurm/*.sh on a real two-node SLURM cluster (slurmctld + 2 slurmd) on this host."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BUDGET_END_UNDER_LOAD_S, ROOT, TINY_MODEL, env, metrics, run, summary, time_left, wait_for_file

# One test worker for the module: its cluster listens on fixed ports.
pytestmark = [pytest.mark.timeout(420), pytest.mark.xdist_group("slurm")]


# --- the launcher against a faked SLURM environment (scontrol answered by a script) -----------------

def fake_scontrol(tmp_path: Path, nodes: list[str], addr: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f"""#!/bin/sh
case "$1 $2" in
  "show hostnames") printf '%s\\n' {' '.join(nodes)} ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr={addr} NodeHostName=$3 State=IDLE" ;;
  *) exit 1 ;;
esac
""")
    script.chmod(0o755)
    return bin_dir


@pytest.fixture
def launcher(in_process):
    """`python -m launcher ARGS` in this process, with the environment a subprocess would get (env)."""
    from launcher.launch import main

    return lambda args, **extra: in_process(main, args, **extra)


def test_dry_run_for_4_nodes_x_8_gpus_is_exactly_the_expected_command_per_node(tmp_path, launcher):
    bin_dir = fake_scontrol(tmp_path, ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a04"], "127.0.0.1")
    slurm = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-04]",
                 SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8")
    for rank in range(4):
        r = launcher(["--dry-run", "--", "--preset", "resnet18", "--epochs", "30"], SLURM_NODEID=str(rank), **slurm)
        assert r.returncode == 0, r.stderr
        expected = (f"{sys.executable} -m accelerate.commands.launch --config_file {ROOT}/launcher/ddp.yaml "
                    f"--multi_gpu --num_processes 32 --num_machines 4 --machine_rank {rank} "
                    f"--main_process_ip 127.0.0.1 --main_process_port 24242 "
                    f"{ROOT}/cifar_dist/train.py --preset resnet18 --epochs 30")
        assert r.stdout.strip() == expected


def test_local_dry_run_on_this_cpu_machine(launcher):
    r = launcher(["--dry-run", "--nproc", "2", "--", "--dataset", "synthetic"])
    assert r.returncode == 0
    assert r.stdout.startswith("ACCELERATE_USE_CPU=1 ")  # `--cpu` would start one process, not two
    assert "--multi_gpu --num_processes 2 --num_machines 1 --machine_rank 0" in r.stdout


@pytest.mark.parametrize("case, text", [
    ("no node rank", "SLURM_NODEID is not set"),
    ("unresolvable head", "does not resolve"),
    ("inconsistent world", "gives 2 nodes, SLURM says 3"),
    ("rank outside", "SLURM_NODEID 5 is outside the 2 nodes"),
])
def test_launcher_failures_are_one_line_not_a_hang(tmp_path, launcher, case, text):
    addr = "no-such-host.invalid" if case == "unresolvable head" else "127.0.0.1"
    bin_dir = fake_scontrol(tmp_path, ["n1", "n2"], addr)
    slurm = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-2]",
                 SLURM_JOB_NUM_NODES="3" if case == "inconsistent world" else "2",
                 SLURM_NODEID={"no node rank": None, "rank outside": "5"}.get(case, "0"))
    start = time.time()
    r = launcher(["--", "--dataset", "synthetic"], **slurm)
    assert r.returncode == 2 and time.time() - start < 30
    assert r.stderr.strip().count("\n") == 0 and text in r.stderr, r.stderr


def test_max_restarts_goes_through_torch_elastic_with_a_fresh_store_every_restart(launcher):
    """Several processes: accelerate launch's torch elastic; one process: torchrun itself (accelerate launch
    gives one process no agent, and refuses it --multi_gpu). That both really restart a killed worker is
    tests/test_elastic.py's."""
    one = launcher(["--dry-run", "--max-restarts", "3", "--", "--dataset", "synthetic"])
    two = launcher(["--dry-run", "--nproc", "2", "--max-restarts", "3", "--", "--dataset", "synthetic"])
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    for r in (one, two):
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " in r.stdout  # a fresh store for every restart
    assert "-m torch.distributed.run --nnodes 1 --nproc-per-node 1 --max-restarts 3 --rdzv-backend c10d " in one.stdout
    assert "--multi_gpu --num_processes 2 " in two.stdout and "--max_restarts 3 --rdzv_backend c10d " in two.stdout


@pytest.mark.parametrize("args, text", [
    (["--nproc", "0"], "argument --nproc: must be at least 1, got 0"),
    (["--nproc", "two"], "argument --nproc: 'two' is not an integer"),
    (["--max-restarts", "-1"], "argument --max-restarts: must be at least 0, got -1"),
    (["--backend", "horovod"], "argument --backend: invalid choice: 'horovod'"),
])
def test_launcher_options_out_of_range_are_refused_not_replaced(tmp_path, main_in_process, args, text):
    from launcher.launch import main

    code, err = main_in_process(main, [*args, "--dry-run", "--", "--dataset", "synthetic"])
    assert code == 2 and err.strip().count("\n") == 0 and text in err, err


def test_an_unusable_master_port_is_refused(tmp_path, main_in_process):
    from launcher.launch import main

    code, err = main_in_process(main, ["--dry-run", "--", "--dataset", "synthetic"], MASTER_PORT="80")
    assert code == 2 and "port 80 is not usable" in err, err


# --- a real cluster ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    e = env(SLURM_LOCAL_DIR=str(root / "cluster"), SLURMCTLD_PORT="26817", SLURMD_PORTS="27001-27002")
    up = run([str(ROOT / "slurm" / "local-cluster.sh"), "up"], 300, env=e)
    if up.returncode == 3 and os.environ.get("CI") != "true":  # no SLURM, and no root with apt-get to install it
        pytest.skip(up.stderr.strip().splitlines()[-1])
    assert up.returncode == 0, up.stdout + up.stderr
    e["SLURM_CONF"] = str(root / "cluster" / "slurm.conf")
    yield e, root
    subprocess.run([str(ROOT / "slurm" / "local-cluster.sh"), "down"], env=e, timeout=60)


def sbatch(cluster, script, sbatch_args, args, workdir, unset=()):
    """Submit a job script with the test's environment (less the names in `unset`), which SLURM passes on."""
    e = {k: v for k, v in cluster[0].items() if k not in unset}
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={workdir}/slurm-%j.out",
                        *sbatch_args, str(ROOT / "slurm" / script), *args], env=e, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job(cluster, job_id) -> dict:
    e, _ = cluster
    try:
        out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], env=e, capture_output=True, text=True,
                             timeout=30).stdout
    except subprocess.TimeoutExpired:  # a controller too busy to answer: ask again at the next poll
        return {}
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(cluster, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300) -> dict:
    """The job's record once it reaches one of `states`; gives up at `timeout` (or the test's deadline)
    with the job's record, its log and the controller's log."""
    limit = time_left(timeout)
    deadline = time.time() + limit
    while time.time() < deadline:
        info = job(cluster, job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    _, root = cluster
    logs = "".join(f"\n--- {p.name}, last lines:\n{p.read_text()[-2000:]}"
                   for p in (*root.parent.rglob(f"slurm-{job_id}.out"), root / "cluster" / "slurmctld.log"))
    raise AssertionError(f"job {job_id} not {'/'.join(states)} after {limit:.0f}s: {job(cluster, job_id)}{logs}")


def test_a_slurm_time_budget_is_the_jobs_time_left_less_its_margin(cluster, tmp_path):
    """--time-budget slurm-80s in a job of 2 minutes (USR1 5 s before its end, which SLURM may send up to
    a minute early: 55 s in at the earliest): the budget is what squeue gave the job when training planned,
    less 80 s (the job ends 40 s in, and its end); the job ends within it, evaluated, not requeued. The
    job's start-up before the plan took 11 s, and 31 s as a fresh machine's first job (slurm-95s was
    refused there: 89 s left)."""
    out, margin = tmp_path / "run", 80
    j = sbatch(cluster, "train.sh", ["--nodes=1", "--cpus-per-task=1", "--time=2", "--signal=B:USR1@5"],
               [*TINY_MODEL, "--time-budget", f"slurm-{margin}s", "--output-dir", str(out)], tmp_path)
    info = wait_for(cluster, j, timeout=150)
    log = (tmp_path / f"slurm-{j}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-3000:]
    plan = summary(out)["time_budget"]
    assert f"time budget {plan['budget_s']:.0f}s: " in log
    left = plan["budget_s"] - plan["started_after_s"] + margin  # squeue's time left when the plan was made
    assert margin < left <= 120, plan  # the job's 2 minutes, less its start-up before the plan
    assert plan["used_s"] <= plan["budget_s"] + BUDGET_END_UNDER_LOAD_S and "test_acc" in metrics(out)[-1]


def test_sbatch_two_nodes_trains_one_ddp_world_that_a_signal_requeues_and_resumes_every_epoch_once(cluster, tmp_path):
    """One two-node job (one run of the cluster's, for both things): one DDP world over the nodes, whose
    threads are the allocation's; then USR1, as SLURM sends it before the time limit: it checkpoints,
    requeues and resumes, every epoch once."""
    e, _ = cluster
    out = tmp_path / "run"
    # no thread count of the user's: the allocation's 1 CPU per task decides, on a cluster whose
    # affinity mask is the whole machine (no task/affinity plugin)
    j = sbatch(cluster, "train.sh", ["--nodes=2", "--cpus-per-task=1"],
               [*TINY_MODEL, "--epochs", "6", "--log-every", "1", "--output-dir", str(out)], tmp_path,
               unset=("OMP_NUM_THREADS",))
    assert wait_for_file(out / "checkpoints" / "epoch-0002", timeout=240, poll=0.1)
    # what SLURM does at --signal=B:USR1@<seconds> before the time limit: USR1 to the batch shell
    subprocess.run(["scancel", "--batch", "--signal=USR1", j], env=e, check=True)
    info = wait_for(cluster, j, states=("PENDING",), timeout=120)
    assert info["Restarts"] == "1"  # requeued; it starts again once the cluster's cred_expire (10 s) has passed
    info = wait_for(cluster, j)
    log = (tmp_path / f"slurm-{j}.out").read_text()  # both starts' output (train.sh: --open-mode=append)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "stopped by a signal" in log and "resumed from" in log and "(restart 1)" in log
    assert log.count("with 1 thread(s) each (auto: 1 cores (SLURM_CPUS_PER_TASK) / 1 process(es))") == 2, log[-3000:]
    assert "node 0/2" in log and "node 1/2" in log  # each node its own rank
    assert [m["epoch"] for m in metrics(out)] == list(range(1, 7))  # every epoch exactly once
    assert log.count("epoch   6/6 |") == 1
    s = summary(out)
    assert s["epochs_completed"] == 6 and s["world_size"] == 2
    assert s["rank_weight_digests"][0] == s["rank_weight_digests"][1]
    assert (out / "model.pt").is_file() and (out / "curves.png").is_file()


@pytest.mark.timeout(600)
def test_tune_job_on_two_nodes_runs_a_pbt_search(cluster, tmp_path):
    """A PBT search on a two-node Ray cluster (one CPU each, a trial on each): the hopeless lr copies the
    good one's checkpoint (one perturbation, after epoch 1: what this tests)."""
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.05, 0.00001]}\nstages: 2\nbase_width: 8\nblocks_per_stage: 1\nbatch_size: 100\n"
                     "mutate: {tta: {choice: [none, flip]}}\n")
    out = tmp_path / "search"
    j = sbatch(cluster, "tune.sh", ["--nodes=2", "--cpus-per-task=1"],
               ["--dataset", "synthetic", "--val-size", "300", "--space", str(space), "--num-samples", "1",
                "--max-epochs", "2", "--scheduler", "pbt", "--perturbation-interval", "1", "--output-dir", str(out)],
               tmp_path)
    info = wait_for(cluster, j, timeout=540)
    log = (tmp_path / f"slurm-{j}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 Ray nodes up" in log and "Ray stopped" in log
    assert (out / "best.yaml").is_file() and len((out / "results.csv").read_text().splitlines()) == 3
    exploits = [line.split(",") for line in (out / "exploits.csv").read_text().splitlines()[1:]]
    assert any(t.endswith("00001") and donor.endswith("00000") for t, _, donor, *_ in exploits), log[-3000:]


def test_a_failed_node_requeues_the_job_onto_the_node_left(cluster, tmp_path):
    """Submitted on a range (--nodes=1-2) it starts on both nodes; n2 dies (its slurmd stops, the controller
    marks it down): SLURM requeues the job, which comes back on n1 alone and resumes there, 2 processes'
    checkpoint on 1, every epoch once. (Last in this module: n2 is brought back afterwards.)"""
    e, _ = cluster
    out = tmp_path / "run"
    j = sbatch(cluster, "train.sh", ["--nodes=1-2", "--cpus-per-task=1"],
               [*TINY_MODEL, "--sync-bn", "--epochs", "4", "--log-every", "1", "--output-dir", str(out)], tmp_path)
    assert wait_for_file(out / "checkpoints" / "epoch-0001", timeout=240, poll=0.1)
    assert job(cluster, j)["NodeList"] == "n[1-2]"
    cluster_sh = [str(ROOT / "slurm" / "local-cluster.sh")]
    try:
        subprocess.run([*cluster_sh, "fail", "n2"], env=e, check=True, timeout=60)
        info = wait_for(cluster, j, timeout=360)
    finally:
        subprocess.run([*cluster_sh, "recover", "n2"], env=e, timeout=60)
    log = (tmp_path / f"slurm-{j}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["NodeList"] == "n1", log[-3000:]
    assert "saved by 2 process(es), resumed on 1" in log
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3, 4]  # every epoch exactly once
    s = summary(out)
    assert s["world_size"] == 1 and s["resumes"][0]["saved_by"] == 2
