#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the slurm backend and for the tests.
#
#   tools/slurm_localhost.sh start DIR   write DIR/slurm.conf, start munged, slurmctld and slurmd
#   tools/slurm_localhost.sh stop DIR    stop the daemons started from DIR
#
# Afterwards `export SLURM_CONF=DIR/slurm.conf` points sbatch/squeue at it. Needs root and Debian's
# slurm-wlm and munge packages (tools/install.sh installs them when run as root). Exits non-zero
# with the reason and the daemon logs when the cluster does not come up.
set -euo pipefail

usage="usage: $0 start|stop DIR"
[ $# -eq 2 ] || { echo "${usage}" >&2; exit 2; }
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=${dir}/slurm.conf

stop() {
  for name in slurmd slurmctld munged; do
    if [ -f "${dir}/${name}.pid" ]; then
      kill "$(cat "${dir}/${name}.pid")" 2>/dev/null || true
      rm -f "${dir}/${name}.pid"
    fi
  done
}

fail() {
  echo "$0: $*" >&2
  for f in "${dir}"/munged.log "${dir}"/slurmctld.log "${dir}"/slurmd.log; do
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

stop  # a previous cluster from the same DIR
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "${dir}/state" "${dir}/spool" "${dir}/munge"
cat > "${conf}" <<EOF
# One-node cluster on ${host}, written by tools/slurm_localhost.sh
ClusterName=localhost
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=${dir}/munge/munge.socket
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd.pid
SlurmctldLogFile=${dir}/slurmctld.log
SlurmdLogFile=${dir}/slurmd.log
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
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

munged --force --socket="${dir}/munge/munge.socket" --pid-file="${dir}/munged.pid" \
  --log-file="${dir}/munged.log" --seed-file="${dir}/munge/munge.seed" || fail "munged did not start"
export SLURM_CONF=${conf}
slurmctld -f "${conf}" || fail "slurmctld did not start"
slurmd -f "${conf}" || fail "slurmd did not start"

for _ in $(seq 1 60); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1)
  case "${state}" in
    idle|mixed|allocated) echo "Slurm is up: node ${host} (${cpus} CPUs, ${mem_mb} MB); export SLURM_CONF=${conf}"; exit 0 ;;
  esac
  sleep 1
done
fail "node ${host} did not become idle within 60 s (state: '${state:-none}')"
