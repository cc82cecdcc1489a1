#!/usr/bin/env bash
# The ESPnet2 demonstration (docs/results/espnet/RESULTS.md), from a recipe directory whose data/
# holds stages 0-2 of the built-in corpus:
#   1. bench/train_espnet.py: a 12-layer Transformer CTC/attention model trained by ESPnet's own
#      asr_train for at most --minutes (default 40);
#   2. run.sh stages 4-8 on it (--model_type espnet): 12 -> 6 with every method, fine-tuning;
#   3. bench/espnet_speech2text_rows.py: the main rows decoded by ESPnet's Speech2Text (test set);
#   4. bin/search_quality.py at P = 6 (every default score against all 924 proposals).
# Wall times go to exp/espnet_demo_timings.txt. Heavy: wrap it in the machine's CPU lock if
# there is one, e.g. flock /work/cpu.lock bench/espnet_demo.sh
#   bench/espnet_demo.sh [--minutes M]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
minutes=40
if [ "${1:-}" = --minutes ]; then minutes=$2; fi
"$root/utils/setup.sh" --quiet --espnet
py=$root/.venv-espnet/bin/python
model=$(pwd)/exp/espnet_asr/model
mkdir -p exp
timed() {
  local start
  start=$(date +%s)
  "$@"
  echo "$(( $(date +%s) - start )) s: $*" >> exp/espnet_demo_timings.txt
}
timed "$py" "$root/bench/train_espnet.py" --recipe_dir . --out_dir exp/espnet_asr --minutes "$minutes"
timed "$root/run.sh" --stage 4 --stop_stage 8 --model_type espnet --model_dir "$model" \
  --exp_dir exp/espnet --finetune_config "$root/conf/espnet/finetune.yaml"
timed "$py" "$root/bench/espnet_speech2text_rows.py" --exp_dir exp/espnet --set test-clean --beam_size 5
timed "$py" "$root/bin/search_quality.py" --exp_dir exp/espnet --model_type espnet --model_dir "$model" \
  --num_prune 6 --calib_num_utts 320 --calib_sizes 320 --scores residual_sum dc svcca cka \
  --poolings frames --frames_per_utt 50 --output_dir exp/espnet/search_quality
