# Job backends, ESPnet style. Every backend takes
#   ${cmd} [--gpu N] [--mem M] [--num_threads T] [--time T] [--num_nodes M] [--max_jobs_run K] \
#          [JOB=1:N] LOG command...
# cmd_backend: local (this machine) or slurm (sbatch arrays; flags from conf/slurm.conf).
# Choose with `cmd_backend=slurm ./run.sh ...` or by editing the default below.
# sf.sh adds the GPUs (--gpu) and, for training, the CPUs of each stage; the resources below are
# per job (Slurm's --mem is per CPU).
cmd_backend=${cmd_backend:-local}

case "${cmd_backend}" in
  local)
    export feats_cmd="utils/run_local.sh --num_threads 1"
    export train_cmd="utils/run_local.sh"
    export decode_cmd="utils/run_local.sh --num_threads 1"
    ;;
  slurm)
    export feats_cmd="utils/run_slurm.py --config conf/slurm.conf --num_threads 2 --mem 4G"
    export train_cmd="utils/run_slurm.py --config conf/slurm.conf --mem 8G"
    export decode_cmd="utils/run_slurm.py --config conf/slurm.conf --num_threads 2 --mem 8G"
    ;;
  *)
    echo "cmd.sh: unknown cmd_backend '${cmd_backend}' (local or slurm)" >&2
    return 1
    ;;
esac
