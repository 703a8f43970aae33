#!/usr/bin/env bash
# Launch a training entry point on one process, several processes of one node, or several nodes:
#
#   utils/torchrun.sh [--nproc_per_node N] [--nnodes M] [--master_port P] -m module args...
#
# N = M = 1: plain `python`. One node: `torchrun --standalone`. M > 1 nodes: inside a Slurm
# allocation of M nodes (cmd_backend=slurm, ${train_cmd} --num_nodes M), srun starts one torchrun
# per node with the job's CPUs and GPUs of each node, and they meet at the allocation's first node
# (c10d rendezvous, id = the Slurm job id, port derived from it unless given, so that two jobs
# sharing a node do not collide). The job's CPU threads (OMP_NUM_THREADS, else every CPU this
# process may use) are divided among the processes of a node.
set -euo pipefail

nproc_per_node=1
nnodes=1
master_port=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --nproc_per_node) nproc_per_node=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --master_port) master_port=$2; shift 2 ;;
    *) echo "$0: unknown option $1" >&2; exit 1 ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--nproc_per_node N] [--nnodes M] [--master_port P] -m module args..." >&2; exit 1; }

if [ "${nproc_per_node}" -eq 1 ] && [ "${nnodes}" -eq 1 ]; then
  exec python "$@"
fi

threads=${OMP_NUM_THREADS:-$(nproc)}
export OMP_NUM_THREADS=$(( threads / nproc_per_node > 0 ? threads / nproc_per_node : 1 ))

if [ "${nnodes}" -eq 1 ]; then
  exec python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "${nproc_per_node}" "$@"
fi

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "$0: --nnodes ${nnodes} needs a Slurm allocation of ${nnodes} nodes (cmd_backend=slurm and --num_nodes ${nnodes})" >&2
  exit 1
fi
if [ "${SLURM_JOB_NUM_NODES:-1}" -ne "${nnodes}" ]; then
  echo "$0: --nnodes ${nnodes} but the Slurm job ${SLURM_JOB_ID} has ${SLURM_JOB_NUM_NODES:-1} node(s)" >&2
  exit 1
fi
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
head_addr=$(scontrol show node "${head_node}" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
master_port=${master_port:-$((20000 + SLURM_JOB_ID % 20000))}
step_resources=()
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && step_resources+=(--cpus-per-task "${SLURM_CPUS_PER_TASK}")
[ -n "${SLURM_GPUS_ON_NODE:-}" ] && step_resources+=(--gres "gpu:${SLURM_GPUS_ON_NODE}")
echo "$0: ${nnodes} nodes x ${nproc_per_node} processes, rendezvous at ${head_addr:-${head_node}}:${master_port}" >&2
exec srun --nodes "${nnodes}" --ntasks-per-node 1 "${step_resources[@]}" --kill-on-bad-exit=1 \
  python -m torch.distributed.run --nnodes "${nnodes}" --nproc_per_node "${nproc_per_node}" \
  --rdzv_backend c10d --rdzv_endpoint "${head_addr:-${head_node}}:${master_port}" --rdzv_id "${SLURM_JOB_ID}" "$@"
