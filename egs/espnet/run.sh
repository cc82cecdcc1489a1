#!/usr/bin/env bash
# ESPnet2 recipe: a 12-layer Transformer CTC/attention model trained here by ESPnet's own
# asr_train (conf/train_transformer12.yaml, a wall-time budget), packed for comflp and pruned
# 12 -> 6 as an ESPnet2 model (--model_type espnet, stages 4-8 in .venv-espnet), then the main
# rows decoded by ESPnet's own Speech2Text beam search. A thin wrapper around comflp's stage
# driver (../../run.sh), run in this directory:
#   ./run.sh                                   # corpus, training (40 min), stages 4-8, Speech2Text
#   ./run.sh --stage 4 --stop_stage 7          # the searches and the table again
#   ./run.sh --train_args "--minutes 10"       # a shorter training
# Stages 0-1 make the built-in corpus, stage 3 is local/train.py in .venv-espnet (Kaldi data
# directories, token list, collect_stats, asr_train, packing), stages 4-8 prune
# exp/espnet_asr/model in exp/encoder/ (the stage loop: utils/recipe.sh), and after stage 8
# local/speech2text_rows.py decodes the test set with ESPnet's joint CTC/attention beam search.
# The settings below replace the driver's defaults; options given on the command line win
# over them. Results of this setting: docs/results/espnet/.
set -euo pipefail
recipe_dir=$(cd "$(dirname "$0")" && pwd)
comflp_root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)

model_dir=exp/espnet_asr/model
train_args="--minutes 40"
recipe_options=(
  --model_type espnet --model_dir "$model_dir"
  --finetune_config conf/finetune.yaml
)
stacks=encoder
stop_stage=8
espnet_python=$comflp_root/.venv-espnet/bin/python
train_model() {
  "$comflp_root/utils/setup.sh" --quiet --espnet
  "$espnet_python" local/train.py --recipe_dir . --out_dir "$(dirname "$model_dir")" $train_args
}
source "$comflp_root/utils/recipe.sh"
recipe_main "$@"
if [ "$stage" -le 8 ] && [ "$stop_stage" -ge 8 ]; then
  mkdir -p exp/log
  echo "$(date '+%F %T') (recipe) ESPnet's Speech2Text on the main rows, log in exp/log/speech2text.log"
  "$espnet_python" local/speech2text_rows.py --exp_dir exp/encoder --set test-clean \
    --beam_size 5 >exp/log/speech2text.log 2>&1 \
    || { tail -n 5 exp/log/speech2text.log >&2; exit 1; }
fi
