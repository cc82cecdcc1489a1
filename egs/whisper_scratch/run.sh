#!/usr/bin/env bash
# Whisper-from-scratch recipe: a small Whisper architecture (8 encoder + 8 decoder layers,
# d_model 144, a character vocabulary, an 8-second window) trained here by transformers' own
# WhisperForConditionalGeneration, then both stacks pruned by half as a Hugging Face model
# (--model_type hf) and the pruned decoder recovered by fine-tuning. The deep decoder that
# Whisper tiny.en (egs/whisper, 4 decoder layers) lacks. A thin wrapper around comflp's stage
# driver (../../run.sh), run in this directory:
#   ./run.sh                                   # corpus, training (42 min), both stacks, stage 8
#   ./run.sh --stage 4 --stop_stage 7 --stacks decoder
# Stages 0-1 make the built-in corpus, stage 3 is local/train.py (a wall-time budget), stages
# 4-7 run per stack in exp/<stack>/ with P = half its layers, stage 8 on the decoder (the stage
# loop: utils/recipe.sh). The settings below replace the driver's defaults; options given on
# the command line win over them. Results of this setting: docs/results/whisper/.
set -euo pipefail
recipe_dir=$(cd "$(dirname "$0")" && pwd)
comflp_root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)

model_dir=exp/whisper
train_args="--minutes 42 --eval_every 1000"
recipe_options=(
  --model_type hf --model_dir "$model_dir"
  --decoding_method attention_greedy_search
  --num_prune 4
  --calib_set train-clean-100 --fine_num_utts 100
  --finetune_config conf/finetune.yaml
  --decode_nj 1
)
stacks="encoder decoder"
train_model() {
  "$comflp_root/.venv/bin/python" local/train.py --workdir . --out_dir "$model_dir" $train_args
}
source "$comflp_root/utils/recipe.sh"
recipe_main "$@"
