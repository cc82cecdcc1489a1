# shellcheck shell=bash disable=SC2034,SC2317  # sourced by run.sh, which uses the *_cmd variables
# Which backend runs each kind of job (ESPnet style). Every *_cmd is used as
#   $train_cmd [--gpu N] [--mem 8G] [--time 4:00:00] [--num_threads N] [--max_jobs_run N] \
#     [JOB=1:N] LOG command ...
# JOB is replaced by the task number (1..N) in LOG and in the command; see utils/launch.py.
#   local: the tasks run on this machine, at most --max_jobs_run at a time (default: one
#          per core); --gpu, --mem and --time are ignored.
#   slurm: one sbatch job (a job array for JOB=1:N) in this directory and environment;
#          the options become sbatch flags through conf/slurm.conf (the recipe's, else
#          comflp's). The launcher waits for the job; Ctrl-C cancels it.
# Choose with `cmd_backend=slurm ./run.sh ...` (or export cmd_backend), or edit the default.
# Per-kind overrides go after the case, e.g. decode_cmd="launch.py --backend slurm --mem 4G".
#   train_cmd:  CPU jobs (data preparation, features, training on CPU, search)
#   decode_cmd: decoding and scoring
#   cuda_cmd:   jobs that want GPUs; the caller adds --gpu N
cmd_backend=${cmd_backend:-local}
case "$cmd_backend" in
  local)
    train_cmd="launch.py --backend local"
    decode_cmd="launch.py --backend local"
    cuda_cmd="launch.py --backend local"
    ;;
  slurm)
    train_cmd="launch.py --backend slurm"
    decode_cmd="launch.py --backend slurm"
    cuda_cmd="launch.py --backend slurm"
    ;;
  *)
    echo "cmd.sh: unknown cmd_backend '$cmd_backend' (expected local or slurm)" >&2
    return 1 2>/dev/null || exit 1
    ;;
esac
