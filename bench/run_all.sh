#!/usr/bin/env bash
# Runs every benchmark of bench/ one after another with its full-size settings; each writes its
# Markdown table to OUTDIR/<name>.md and its log to OUTDIR/log/<name>.log, and OUTDIR/machine.md
# describes the machine. A failed benchmark does not stop the others; the exit status is 1 if
# any failed. Run it on a quiet machine from the directory where ./run.sh ran stages 0-6:
#   bench/run_all.sh [--outdir exp/bench] [--name value ...]     (bench/run_all.sh --help)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

outdir=exp/bench        # where the tables go
workdir=.               # where ./run.sh ran stages 0-2 (data/fbank, data/lang_*)
exp_dir=exp/baseline    # the trained 12-layer baseline (stage 3)
pruned_dir=             # its pruned model (default: EXP_DIR/search/comflp_dc_prune6/pruned, stage 6)
exp24=                  # search_cost: a trained 24-layer experiment directory (else trained here)
exp48=                  # search_cost: a trained 48-layer experiment directory (else trained here)
train_epochs=2          # search_cost: epochs for a depth without a directory (0: random weights)
search_dev_num_utts=200 # search_cost: dev utterances of every metric search (GLP at L = 48 evaluates 876 models)
lang_dir=data/lang_char # interctc_ablation: the tokenizer directory, in WORKDIR
corr_threads=2          # correlation_speed: torch threads (its target is for 2 CPU cores)
interctc_ablation=false # also run bench/interctc_ablation.py (trains two models)
ablation_epochs=3       # interctc_ablation: epochs per model
ablation_num_train=2000 # interctc_ablation: training utterances (0: all)

# shellcheck disable=SC2034  # read by utils/parse_options.sh
help_message="Usage: $0 [--name value ...]
Runs correlation_speed, search_cost, decode_speed, train_throughput and dump_memory
(and interctc_ablation with --interctc_ablation true), tables in OUTDIR/<name>.md.
Options (defaults in brackets):
$(sed -n '/^outdir=/,/^ablation_num_train=/p' "$0" | sed -E 's/^([a-z_0-9]+)=([^ ]*) *#? ?(.*)$/  --\1 [\2] \3/')"

. "$root/utils/parse_options.sh"
. "$root/utils/log.sh"
. "$root/path.sh"

pruned_dir=${pruned_dir:-$exp_dir/search/comflp_dc_prune6/pruned}
mkdir -p "$outdir/log"
written=() failed=()

bench() {  # bench NAME SCRIPT ARGS...: one benchmark, its table in OUTDIR/NAME.md
  local name=$1 script=$2
  shift 2
  log "benchmark $name (log: $outdir/log/$name.log)"
  if python "$root/bench/$script" "$@" --output "$outdir/$name.md" >"$outdir/log/$name.log" 2>&1; then
    written+=("$outdir/$name.md")
  else
    failed+=("$name (see $outdir/log/$name.log)")
  fi
}

{
  echo "# Machine"
  echo
  echo "- date: $(date '+%Y-%m-%d %H:%M')"
  echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores visible"
  echo "- memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
  echo "- OS: $(uname -sr)"
  echo "- python: $(python -c 'import platform; print(platform.python_version())')"
  echo "- torch: $(python -c 'import torch; print(torch.__version__, "CUDA", torch.cuda.is_available())')"
  echo "- GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none)"
  echo "- comflp commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$outdir/machine.md"

bench correlation_speed correlation_speed.py --layers 48 --num_samples 512 --dim 256 \
  --threads "$corr_threads"
search_models=(--exp12 "$exp_dir")
[ -n "$exp24" ] && search_models+=(--exp24 "$exp24")
[ -n "$exp48" ] && search_models+=(--exp48 "$exp48")
bench search_cost search_cost.py --workdir "$workdir" --layers "12 24 48" "${search_models[@]}" \
  --train_epochs "$train_epochs" --build_dir "$workdir/exp/bench_search_cost" \
  --calib_num_utts 320 --beam_size 10 --top_k 10 --dev_num_utts "$search_dev_num_utts" \
  --oracle_max 1000
bench decode_speed decode_speed.py --workdir "$workdir" --exp_dir "$exp_dir" \
  --pruned_dir "$pruned_dir" --threads "1 2" --repeats 3 --beam_size 10
bench train_throughput train_throughput.py --workdir "$workdir" --config "$root/conf/train.yaml" \
  --tokenizer_dir "$exp_dir" --nproc 2 --warmup 3 --steps 20
bench dump_memory dump_memory.py --workdir "$workdir" --exp_dir "$exp_dir" --num_utts "320 3200"
if [ "$interctc_ablation" = true ]; then
  bench interctc_ablation interctc_ablation.py --workdir "$workdir" --config "$root/conf/train.yaml" \
    --lang_dir "$lang_dir" --exp_root "$workdir/exp/interctc_ablation" \
    --epochs "$ablation_epochs" --num_train "$ablation_num_train"
fi

cat "$outdir/machine.md"
for table in "${written[@]}"; do
  log "wrote $table"
done
if [ ${#failed[@]} -gt 0 ]; then
  die "failed: ${failed[*]}"
fi
log "all tables are in $outdir"
