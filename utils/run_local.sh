#!/usr/bin/env bash
# Local job backend with ESPnet's queue interface:
#   run_local.sh [--gpu N] [--mem M] [--num_threads T] [--time T] [--num_nodes 1] [--max_jobs_run K] \
#                [JOB=1:N] exp/log/name.JOB.log command args...
# "JOB" (a whole word: not the one in $SLURM_JOB_ID) in the log name and the command is replaced
# by the job index. Jobs run in parallel (at most K at once, default: number of CPUs), each
# writing its own log. When any job fails, the failing indices and their logs are printed and the
# exit status is 1.
#
# --gpu N gives each running job N GPUs of its own through CUDA_VISIBLE_DEVICES (from the GPUs this
# shell may use: its CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists), so at most
# (GPUs / N) jobs run at once; --gpu 0 hides the GPUs from the jobs.
set -u

max_jobs_run=$(nproc)
num_threads=""
gpu=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --gpu) gpu=$2; shift 2 ;;
    --mem|--time|--config) shift 2 ;;  # accepted for interface parity; nothing to reserve locally
    --num_threads) num_threads=$2; shift 2 ;;
    --num_nodes)
      [ "$2" -eq 1 ] || { echo "$0: --num_nodes $2: the local backend has one node (use cmd_backend=slurm)" >&2; exit 1; }
      shift 2 ;;
    --max_jobs_run) max_jobs_run=$2; shift 2 ;;
    *) echo "$0: unknown option $1" >&2; exit 1 ;;
  esac
done

var="" first=1 last=1
if [[ $# -gt 0 && "$1" =~ ^([A-Za-z_][A-Za-z0-9_]*)=([0-9]+):([0-9]+)$ ]]; then
  var=${BASH_REMATCH[1]} first=${BASH_REMATCH[2]} last=${BASH_REMATCH[3]}
  shift
fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [options] [JOB=1:N] <log> <command> [args...]" >&2; exit 1
fi
log=$1; shift
cmd=""
for arg in "$@"; do cmd+="$(printf '%q' "$arg") "; done

# GPU slots: slot k holds GPUs k*N .. k*N+N-1 of the visible ones
declare -a gpus=() slot_pid=() slot_gpus=()
if [ "$gpu" -gt 0 ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi > /dev/null; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
  fi
  if [ "${#gpus[@]}" -lt "$gpu" ]; then
    echo "$0: --gpu $gpu per job, but ${#gpus[@]} GPU(s) visible (CUDA_VISIBLE_DEVICES or nvidia-smi)" >&2
    exit 1
  fi
  for ((k = 0; k < ${#gpus[@]} / gpu; k++)); do
    slot_gpus[k]=$(IFS=,; echo "${gpus[*]:k * gpu:gpu}")
    slot_pid[k]=""
  done
  [ "$max_jobs_run" -gt "${#slot_gpus[@]}" ] && max_jobs_run=${#slot_gpus[@]}
fi

free_slot() {  # a GPU slot whose job has ended
  local k
  for k in "${!slot_gpus[@]}"; do
    if [ -z "${slot_pid[k]}" ] || ! kill -0 "${slot_pid[k]}" 2> /dev/null; then echo "$k"; return; fi
  done
}

run_one() {
  local i=$1 this_log=$2 this_cmd=$3 devices=$4
  mkdir -p "$(dirname "$this_log")"
  {
    echo "# $this_cmd"
    echo "# Started at $(date) on $(hostname)${devices:+ (GPUs ${devices})}"
  } > "$this_log"
  local start=$SECONDS
  ( [ -n "$num_threads" ] && export OMP_NUM_THREADS=$num_threads MKL_NUM_THREADS=$num_threads
    export CUDA_VISIBLE_DEVICES=$devices
    eval "$this_cmd" ) >> "$this_log" 2>&1
  local rc=$?
  echo "# Accounting: time=$((SECONDS - start)) s, exit status $rc" >> "$this_log"
  echo "# Ended at $(date)" >> "$this_log"
  return $rc
}

declare -A pid_of
declare -a failed=()
for ((i = first; i <= last; i++)); do
  if [ -n "$var" ]; then
    this_log=$(sed "s/\b${var}\b/${i}/g" <<< "$log"); this_cmd=$(sed "s/\b${var}\b/${i}/g" <<< "$cmd")
  else
    this_log=$log; this_cmd=$cmd
  fi
  while [[ $(jobs -rp | wc -l) -ge $max_jobs_run ]]; do wait -n 2>/dev/null || true; done
  devices="" slot=""
  if [ "$gpu" -gt 0 ]; then
    slot=$(free_slot)
    [ -n "$slot" ] || { echo "$0: no free GPU slot for job $i (internal error)" >&2; exit 1; }
    devices=${slot_gpus[slot]}
  fi
  run_one "$i" "$this_log" "$this_cmd" "$devices" &
  pid_of[$i]=$!
  [ -n "$slot" ] && slot_pid[slot]=$!
done
for ((i = first; i <= last; i++)); do
  if ! wait "${pid_of[$i]}"; then failed+=("$i"); fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "$0: ${#failed[@]} of $((last - first + 1)) job(s) failed:" >&2
  for i in "${failed[@]}"; do
    if [ -n "$var" ]; then echo "  $var=$i: see $(sed "s/\b${var}\b/${i}/g" <<< "$log")" >&2; else echo "  see $log" >&2; fi
  done
  exit 1
fi
exit 0
