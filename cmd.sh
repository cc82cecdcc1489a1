# Which backend runs each kind of job (ESPnet style). Used as
#   $train_cmd [--gpu N] [--mem 8G] [--time 4:00:00] [--num_threads N] [JOB=1:N] LOG command ...
# JOB is replaced by the task number in LOG and in the command.
#   local: tasks run on this machine, in parallel up to --max_jobs_run (default: all cores)
# Override per kind, e.g. decode_cmd="launch.py --backend local --max_jobs_run 4".
cmd_backend=${cmd_backend:-local}
case "$cmd_backend" in
  local)
    train_cmd="launch.py --backend local"
    decode_cmd="launch.py --backend local"
    cuda_cmd="launch.py --backend local"
    ;;
  *)
    echo "cmd.sh: unknown cmd_backend '$cmd_backend' (expected local)" >&2
    return 1 2>/dev/null || exit 1
    ;;
esac
