# Job backends, ESPnet style. Every backend takes
#   ${cmd} [--gpu N] [--mem M] [--num_threads T] [--time T] [--max_jobs_run K] [JOB=1:N] LOG command...
# cmd_backend: local (this machine).
cmd_backend=${cmd_backend:-local}

case "${cmd_backend}" in
  local)
    export feats_cmd="utils/run_local.sh --num_threads 1"
    export train_cmd="utils/run_local.sh"
    export decode_cmd="utils/run_local.sh --num_threads 1"
    ;;
  *)
    echo "cmd.sh: unknown cmd_backend '${cmd_backend}' (local)" >&2
    return 1
    ;;
esac
