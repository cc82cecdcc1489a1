#!/usr/bin/env bash
# wav2vec2 recipe: a 12-layer Hugging Face Wav2Vec2ForCTC (CoMFLP's class, with the LayerNorm
# before lm_head of CoMFLP's AISHELL model) trained from scratch here by transformers' own
# modules, then pruned 12 -> 6 as a Hugging Face model (--model_type hf) and written back with
# save_pretrained. A thin wrapper around comflp's stage driver (../../run.sh), run in this
# directory:
#   ./run.sh                                   # corpus, training (30 min), stages 4-8
#   ./run.sh --stage 4 --stop_stage 7          # the searches and the table again
#   ./run.sh --train_args "--minutes 5 --architecture hubert --seed 1" --model_dir exp/hubert
# Stages 0-1 make the built-in corpus, stage 3 is local/train.py (a wall-time budget), stages
# 4-8 prune exp/wav2vec2 in exp/encoder/ (the stage loop: utils/recipe.sh). The settings below
# replace the driver's defaults; options given on the command line win over them. Results of
# this setting: docs/results/hf/.
set -euo pipefail
recipe_dir=$(cd "$(dirname "$0")" && pwd)
comflp_root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)

model_dir=exp/wav2vec2
train_args="--minutes 30 --lm_head_norm --warmup_steps 100"
recipe_options=(
  --model_type hf --model_dir "$model_dir"
  --finetune_config conf/finetune.yaml
)
stacks=encoder
train_model() {
  "$comflp_root/.venv/bin/python" local/train.py --workdir . --out_dir "$model_dir" $train_args
}
source "$comflp_root/utils/recipe.sh"
recipe_main "$@"
