#!/usr/bin/env bash
# Multi-node training on SLURM: one srun task per node runs the launcher, which starts
# `accelerate launch` with that node's rank and the head node's address. Arguments go to train.py:
#   sbatch --nodes=2 --gpus-per-node=8 slurm/train.sh --preset resnet18 --epochs 30 --data-dir /data/cifar10
# Any #SBATCH default below can be overridden on the sbatch command line. Launcher options (e.g.
# "--nproc 4" or "--backend ddp") go in $LAUNCHER_ARGS; the Python that runs it in $PYTHON.
# Before the time limit (or at preemption) SLURM sends USR1: training checkpoints, the job requeues
# itself and resumes from that checkpoint in the same output directory (default runs/slurm-<job id>).
# A node that fails requeues the job too (--requeue), from the last epoch's checkpoint. Submitted with a
# range, e.g. --nodes=1-2, it starts on as many nodes as are free and may come back on fewer: training
# resumes on whatever world size it gets. (No --ntasks-per-node here: in the allocation it would make
# SLURM take the fewest nodes of a range; srun below starts one task per node.)
#SBATCH --job-name=cifar-dist
#SBATCH --nodes=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

# A default output directory that survives requeues; an --output-dir given to the job comes later and wins.
args=(--output-dir "runs/slurm-${SLURM_JOB_ID}" "$@")
echo "$(date -Is) job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST} (restart ${SLURM_RESTART_COUNT:-0}): train.py ${args[*]}"

# The run's directory: the last --output-dir wins, as in train.py. A summary.json written during this job
# means training finished (SLURM's warning can come after the end, or up to a minute early): no requeue.
out=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output-dir) out="${args[i + 1]:-}" ;;
    --output-dir=*) out="${args[i]#*=}" ;;
  esac
done
started=$(date +%s)
finished() { [[ -f "${out}/summary.json" ]] && (($(stat -c %Y "${out}/summary.json") >= started)); }

requeue() {
  if finished; then
    echo "$(date -Is) USR1: training has finished, nothing to requeue"
    wait "${srun_pid}"
    exit 0
  fi
  echo "$(date -Is) USR1: asking training to checkpoint, then requeueing"
  scancel --signal=USR1 "${SLURM_JOB_ID}"   # job steps only: the launcher on every node passes it on
  wait "${srun_pid}"
  if finished; then  # it finished its last step before the signal reached it
    echo "$(date -Is) training finished before it could stop; not requeued"
    exit 0
  fi
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
}
trap requeue USR1

# --ntasks-per-node=1: one launcher per node; SLURM_NODEID is read inside each task, not here.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${PYTHON:-python3}" -m launcher ${LAUNCHER_ARGS:-} -- "${args[@]}" &
srun_pid=$!
wait "${srun_pid}"   # the USR1 trap runs while the script waits here
status=$?
echo "$(date -Is) training finished with exit code ${status}"
exit "${status}"
