"""Turn "this machine" or "this SLURM allocation" into the right `accelerate launch` of train.py.

    python -m launcher [--dry-run] [--nproc N] [--backend ddp] [--max-restarts N] -- <train.py arguments>

Local: one process per GPU (or --nproc CPU processes, default 1). Under SLURM (run once per node, as the
task of `srun --ntasks-per-node=1`): the node list from `scontrol show hostnames`, this node's rank from
its own SLURM_NODEID, the head node's address from `scontrol show node`, a port derived from the job id,
processes per node from the GPUs allotted. Anything inconsistent fails with one line and exit code 2,
instead of a hang. SIGUSR1/SIGTERM are passed to the training processes, which checkpoint and stop.
With --max-restarts N, torch elastic restarts the whole group (up to N times) when a process dies, and
training resumes from its last checkpoint by itself.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cifar_dist.backends import BACKENDS, is_deepspeed
from cifar_dist.config import OneLineParser

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "cifar_dist" / "train.py"
PROG = "launcher"


class LaunchError(RuntimeError):
    """The world cannot be built; the message says why."""


@dataclass
class World:
    machines: int
    rank: int
    procs_per_node: int
    head: str
    port: int
    gpu: bool

    @property
    def processes(self) -> int:
        return self.machines * self.procs_per_node


def run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        why = (getattr(e, "stderr", "") or str(e)).strip().splitlines() or ["no output"]
        raise LaunchError(f"`{' '.join(cmd)}` failed: {why[-1]}") from None


def count_gpus(env: dict[str, str]) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key, "").split(":")[-1].isdigit():
            return int(env[key].split(":")[-1])
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def slurm_world(env: dict[str, str], nproc: int | None) -> World:
    job = env.get("SLURM_JOB_ID")
    if "SLURM_NODEID" not in env:
        raise LaunchError("SLURM_NODEID is not set: run the launcher as an srun task (one per node)")
    rank = int(env["SLURM_NODEID"])
    nodes = run(["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")]).split()
    expected = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(nodes))
    if not nodes or len(nodes) != expected:
        raise LaunchError(f"the node list {env.get('SLURM_JOB_NODELIST')!r} gives {len(nodes)} nodes, "
                          f"SLURM says {expected}")
    if not 0 <= rank < len(nodes):
        raise LaunchError(f"SLURM_NODEID {rank} is outside the {len(nodes)} nodes of the job")
    head = head_address(nodes[0])
    gpus = count_gpus(env)
    port = int(env.get("MASTER_PORT") or 20000 + int(job or 0) % 20000)
    return World(len(nodes), rank, nproc or gpus or 1, head, port, gpus > 0)


def head_address(node: str) -> str:
    """The first node's NodeAddr (node names such as n1 need not resolve), checked to resolve."""
    fields = dict(f.split("=", 1) for f in run(["scontrol", "show", "node", node, "-o"]).split() if "=" in f)
    addr = fields.get("NodeAddr") or node
    try:
        return socket.gethostbyname(addr)
    except OSError:
        raise LaunchError(f"the head node {node}'s address {addr!r} does not resolve") from None


def local_world(env: dict[str, str], nproc: int | None) -> World:
    gpus = count_gpus(env)
    return World(1, 0, nproc or gpus or 1, "127.0.0.1", int(env.get("MASTER_PORT") or 29500), gpus > 0)


def check(world: World) -> None:
    if world.procs_per_node < 1 or world.machines < 1:
        raise LaunchError(f"a world of {world.machines} nodes x {world.procs_per_node} processes is empty")
    if not 0 <= world.rank < world.machines:
        raise LaunchError(f"node rank {world.rank} is outside 0..{world.machines - 1}")
    if not 1024 <= world.port < 65536:
        raise LaunchError(f"port {world.port} is not usable")


def command(world: World, backend: str, train_args: list[str],
            max_restarts: int = 0) -> tuple[dict[str, str], list[str]]:
    """The environment additions and the `accelerate launch` command for this node. Restarts need torch
    elastic's agent: several processes get it through accelerate launch; one process (which accelerate
    launch starts without an agent, and will not give --multi_gpu) gets torchrun itself."""
    deepspeed = is_deepspeed(backend)
    # CPU DDP: ACCELERATE_USE_CPU with --multi_gpu (--cpu would start ONE process per node). Not for
    # DeepSpeed, which that variable silently turns into plain DDP; its config names the distribution.
    env = {} if world.gpu or deepspeed else {"ACCELERATE_USE_CPU": "1"}
    if max_restarts:
        # Each restart needs a fresh store for the ranks to meet in: in the agent's own store (static
        # rendezvous, or c10d's shared one) a restarted rank may read a dead rank's address and fail to
        # connect (pytorch#135712). c10d without sharing gives the workers a new store every round.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        if world.processes == 1 and not deepspeed:
            return env, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
                         "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", f"{world.head}:{world.port}", str(TRAIN), *train_args]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(BACKENDS[backend])]
    if world.processes > 1 or deepspeed:
        cmd += [] if deepspeed else ["--multi_gpu"]
        cmd += ["--num_processes", str(world.processes), "--num_machines", str(world.machines),
                "--machine_rank", str(world.rank), "--main_process_ip", world.head,
                "--main_process_port", str(world.port)]
        cmd += ["--max_restarts", str(max_restarts), "--rdzv_backend", "c10d"] if max_restarts else []
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1"]
    return env, cmd + [str(TRAIN), *train_args]


def forward_signals(child: subprocess.Popen) -> None:
    """Pass SIGUSR1/SIGTERM to the training processes themselves (not to accelerate's launcher, which
    would die of SIGUSR1): they checkpoint at the next step and exit cleanly."""
    import psutil

    def handler(signum: int, _frame) -> None:
        for p in psutil.Process(child.pid).children(recursive=True):
            try:
                if any("train.py" in part or "cifar_dist.train" in part for part in p.cmdline()):
                    p.send_signal(signum)
            except psutil.Error:
                pass

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low, else argparse's one-line error and exit code 2."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description="Launch cifar_dist/train.py on this machine or SLURM node.")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--nproc", type=at_least(1), default=None,
                   help="processes per node (default: one per GPU, else 1)")
    p.add_argument("--max-restarts", type=at_least(0), default=0, help="restart the process group up to N times "
                   "when a process dies; training resumes from its last checkpoint (torch elastic)")
    p.add_argument("--backend", default="ddp", choices=sorted(BACKENDS), help="accelerate config to use")
    p.add_argument("--print-head", action="store_true", help="print the head node's address and port, and exit "
                   "(slurm/tune.sh starts Ray there)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for train.py (after --)")
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    env = dict(os.environ)
    try:
        world = slurm_world(env, args.nproc) if env.get("SLURM_JOB_ID") else local_world(env, args.nproc)
        check(world)
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.print_head:
        print(world.head, world.port)
        return 0
    extra, cmd = command(world, args.backend, train_args, args.max_restarts)
    line = " ".join([*(f"{k}={v}" for k, v in extra.items()), *map(shlex.quote, cmd)])
    if args.dry_run:
        print(line)
        return 0
    print(f"{PROG}: node {world.rank}/{world.machines}, {world.procs_per_node} process(es) per node, "
          f"head {world.head}:{world.port}: {line}", flush=True)
    # accelerate's own launcher (and torchrun's agent) would die of SIGUSR1, which SLURM sends to every
    # process of the job step: they inherit "ignore", and train.py installs its own handler.
    child = subprocess.Popen(cmd, env={**env, **extra},
                             preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    forward_signals(child)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
