#!/usr/bin/env bash
# A Slurm cluster on this machine, for trying the slurm backend and for the tests: NUM_NODES
# (default 2) virtual nodes node1..nodeN, one slurmd each, all on this host with all of its CPUs, so
# that multi-node jobs (srun across nodes, torchrun rendezvous) run for real on one machine.
#
#   tools/slurm_localhost.sh start DIR [NUM_NODES]   write DIR/slurm.conf, start munged, slurmctld, slurmd
#   tools/slurm_localhost.sh stop DIR                stop the daemons started from DIR
#
# Afterwards `export SLURM_CONF=DIR/slurm.conf` points sbatch/squeue at it. Needs root and Debian's
# slurm-wlm and munge packages (tools/install.sh installs them when run as root). Exits non-zero
# with the reason and the daemon logs when the cluster does not come up.
set -euo pipefail

usage="usage: $0 start DIR [NUM_NODES] | stop DIR"
[ $# -ge 2 ] && [ $# -le 3 ] || { echo "${usage}" >&2; exit 2; }
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
num_nodes=${3:-2}
conf=${dir}/slurm.conf

stop() {
  local pid_file
  for pid_file in "${dir}"/slurmd.*.pid "${dir}"/slurmctld.pid "${dir}"/munged.pid; do
    if [ -f "${pid_file}" ]; then
      kill "$(cat "${pid_file}")" 2>/dev/null || true
      rm -f "${pid_file}"
    fi
  done
}

fail() {
  echo "$0: $*" >&2
  for f in "${dir}"/munged.log "${dir}"/slurmctld.log "${dir}"/slurmd.*.log; do
    [ -f "${f}" ] && { echo "--- ${f} (tail)" >&2; tail -n 20 "${f}" >&2; }
  done
  stop
  exit 1
}

case "${action}" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "${usage}" >&2; exit 2 ;;
esac

[ "$(id -u)" -eq 0 ] || fail "must run as root (the daemons run as root on this throwaway cluster)"
for bin in munged slurmctld slurmd sbatch sinfo; do
  command -v "${bin}" > /dev/null || fail "${bin} not found: apt-get install -y slurm-wlm munge"
done
[ -f /etc/munge/munge.key ] || fail "/etc/munge/munge.key missing (reinstall the munge package)"
[[ "${num_nodes}" =~ ^[1-9][0-9]*$ ]] || fail "NUM_NODES must be a positive integer, got '${num_nodes}'"

stop  # a previous cluster from the same DIR
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "${dir}/state" "${dir}/munge"
cat > "${conf}" <<EOF
# ${num_nodes} virtual node(s) on ${host}, written by tools/slurm_localhost.sh
ClusterName=localhost
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=${dir}/munge/munge.socket
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool.%n
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd.%n.pid
SlurmctldLogFile=${dir}/slurmctld.log
SlurmdLogFile=${dir}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=node[1-${num_nodes}] NodeHostname=${host} Port=[17001-$((17000 + num_nodes))] CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

munged --force --socket="${dir}/munge/munge.socket" --pid-file="${dir}/munged.pid" \
  --log-file="${dir}/munged.log" --seed-file="${dir}/munge/munge.seed" || fail "munged did not start"
export SLURM_CONF=${conf}
slurmctld -f "${conf}" || fail "slurmctld did not start"
for i in $(seq 1 "${num_nodes}"); do
  mkdir -p "${dir}/spool.node${i}"
  slurmd -f "${conf}" -N "node${i}" || fail "slurmd of node${i} did not start"
done

for _ in $(seq 1 60); do
  n_up=$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)$' || true)
  if [ "${n_up}" -eq "${num_nodes}" ]; then
    echo "Slurm is up: ${num_nodes} node(s) on ${host}, ${cpus} CPUs each; export SLURM_CONF=${conf}"
    exit 0
  fi
  sleep 1
done
fail "only ${n_up} of ${num_nodes} node(s) became idle within 60 s: $(sinfo -h -N -o '%N %T' 2>/dev/null | tr '\n' ' ')"
