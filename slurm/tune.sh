#!/usr/bin/env bash
# A Ray Tune search on a SLURM allocation: a Ray head on the first node, Ray workers on the others,
# then `python tune/search.py --address <head>` with the arguments given here; Ray stops when the
# search ends or the job is cancelled.
#   sbatch --nodes=4 --gpus-per-node=8 slurm/tune.sh --data-dir /data/cifar10 --num-samples 64 --gpus-per-trial 0.5
#SBATCH --job-name=cifar-dist-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
PY=${PYTHON:-python3}
export RAY_DEDUP_LOGS=0
export RAY_prestart_worker_first_driver=0  # idle workers the trials (actors) never take
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0  # it acts on an autoscaler's drain; here SLURM signals the job
# Ray's token authentication: one fresh token for this job, passed to every node (srun exports it).
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$("$PY" -c "import secrets; print(secrets.token_hex(32))")}
read -r head_ip port < <("$PY" -m launcher --print-head) || { echo "cannot find the head node" >&2; exit 2; }
address="${head_ip}:${port}"
# Every Ray process of this job (srun passes the environment on) finds its own cluster through this, even
# when another Ray runs on the same node: Ray Train's calls that free a stopped trial's workers need it.
export RAY_ADDRESS="${address}"
nodes=($(scontrol show hostnames "${SLURM_JOB_NODELIST}"))
cpus=${SLURM_CPUS_PER_TASK:-1}
gpus=$("$PY" -c "from launcher.launch import count_gpus; import os; print(count_gpus(dict(os.environ)))")
echo "$(date -Is) Ray head on ${nodes[0]} (${address}), ${#nodes[@]} nodes, ${cpus} CPUs and ${gpus} GPUs each"

pids=()
stop_ray() {
  kill "${pids[@]}" 2>/dev/null   # srun passes SIGTERM on; `ray start --block` then stops its node
  wait "${pids[@]}" 2>/dev/null
  echo "$(date -Is) Ray stopped"
}
trap stop_ray EXIT

temp=/tmp/ray-${SLURM_JOB_ID}
# The dashboard serves the state API through which Ray Train frees the workers of a trial Tune stopped.
srun --nodes=1 --ntasks=1 -w "${nodes[0]}" ray start --head --block --node-ip-address="${head_ip}" --port="${port}" \
  --num-cpus="${cpus}" --num-gpus="${gpus}" --include-dashboard=true --temp-dir="${temp}-head" &
pids+=($!)
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "${node}" ray start --block --address="${address}" --num-cpus="${cpus}" \
    --num-gpus="${gpus}" --temp-dir="${temp}-${node}" &
  pids+=($!)
done

# Wait until every node has joined (or give up after ~3 minutes).
for _ in $(seq 1 180); do
  alive=$("$PY" -c "import ray, sys; ray.init(address='${address}', logging_level='ERROR', log_to_driver=False); \
print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null | tail -1)
  [ "${alive:-0}" -ge "${#nodes[@]}" ] && break
  sleep 1
done
if [ "${alive:-0}" -lt "${#nodes[@]}" ]; then
  echo "only ${alive:-0} of ${#nodes[@]} Ray nodes joined" >&2
  exit 1
fi
echo "$(date -Is) ${alive} Ray nodes up: python tune/search.py --address ${address} $*"
"$PY" "${SLURM_SUBMIT_DIR:-.}/tune/search.py" --address "${address}" "$@"
