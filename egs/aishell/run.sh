#!/usr/bin/env bash
# AISHELL-1 recipe: train a 12-layer Transformer CTC model on AISHELL-1 (Mandarin, 150 h) and
# prune it with CoMFLP, the setting of the CoMFLP paper (12 -> 6 layers, CER). A thin wrapper
# around comflp's stage driver (../../run.sh): it runs the driver in this directory (data/,
# exp/ and relative paths are here) with the AISHELL-1 settings below, which replace the
# driver's defaults; any option given on the command line wins over them.
#   ./run.sh --corpus_dir /data/aishell --stage 0 --stop_stage 7      # holds data_aishell/
#   ./run.sh --download true --stage 0 --stop_stage 0                  # fetch it first
#   ./run.sh --train_config conf/train_18layer.yaml --exp_dir exp/18layer
# Units: characters (lhotse's preparation removes the spaces between words). The metric is
# the CER: the fine search ranks proposals by dev CER and the results table shows CER only
# (without spaces a WER would count whole sentences as single words).
# Speed perturbation (0.9, 1.0, 1.1) is on, as in the ESPnet, WeNet and icefall recipes.
# Kaldi data directories instead of the corpus: --corpus kaldi --corpus_dir DIR, with one
# directory per subset under DIR, named as the subset, holding wav.scp, text, utt2spk and
# optionally segments.
set -euo pipefail
recipe_dir=$(cd "$(dirname "$0")" && pwd)
comflp_root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
cores=$(nproc)

recipe_options=(
  --corpus aishell
  --corpus_dir download/aishell
  --train_set train
  --dev_set dev
  --test_sets test
  --token_type char
  --speed_perturb true
  --train_config conf/train.yaml
  --finetune_config conf/finetune.yaml
  --fine_metric cer
  --score_metrics cer
  --nj $((cores < 16 ? cores : 16))
)

for arg in "$@"; do
  if [ "$arg" = --help ] || [ "$arg" = -h ]; then
    echo "AISHELL-1 recipe ($0): these settings replace the driver's defaults listed below:"
    printf '  %s %s\n' "${recipe_options[@]}"
    echo
  fi
done
cd "$recipe_dir"
exec "$comflp_root/run.sh" "${recipe_options[@]}" "$@"
