#!/usr/bin/env bash
# LibriSpeech recipe: train a 12-layer Transformer CTC model on LibriSpeech and prune it with
# CoMFLP. A thin wrapper around comflp's stage driver (../../run.sh): it runs the driver in this
# directory (data/, exp/ and relative paths are here) with the LibriSpeech settings below,
# which replace the driver's defaults; any option given on the command line wins over them.
#   ./run.sh --corpus_dir /data/LibriSpeech --stage 0 --stop_stage 7       # 960 h
#   ./run.sh --download true --stage 0 --stop_stage 0                       # fetch it first
#   ./run.sh --train_set train-clean-100 --nbpe 300 --speed_perturb true    # 100 h
#   ./run.sh --train_config conf/train_18layer.yaml --exp_dir exp/18layer   # Lee et al.'s depth
# Subsets: train-960 (train-clean-100 + train-clean-360 + train-other-500, written by stage 0 as
# one cut set data/manifests/cuts_train-960.jsonl.gz) or a single training part; dev-clean
# validates and drives the fine search; dev-other, test-clean and test-other are decoded too.
# Units: BPE, 5000 pieces for 960 h (as ESPnet's LibriSpeech recipes), 300 for 100 h.
# Kaldi data directories instead of the corpus: --corpus kaldi --corpus_dir DIR, with one
# directory per subset under DIR, named as the subset, holding wav.scp, text, utt2spk and
# optionally segments.
set -euo pipefail
recipe_dir=$(cd "$(dirname "$0")" && pwd)
comflp_root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
cores=$(nproc)

recipe_options=(
  --corpus librispeech
  --corpus_dir download/LibriSpeech
  --train_set train-960
  --dev_set dev-clean
  --test_sets "dev-other test-clean test-other"
  --token_type bpe
  --nbpe 5000
  --speed_perturb false
  --train_config conf/train.yaml
  --finetune_config conf/finetune.yaml
  --fine_metric wer
  --nj $((cores < 16 ? cores : 16))
)

for arg in "$@"; do
  if [ "$arg" = --help ] || [ "$arg" = -h ]; then
    echo "LibriSpeech recipe ($0): these settings replace the driver's defaults listed below:"
    printf '  %s %s\n' "${recipe_options[@]}"
    echo
  fi
done
cd "$recipe_dir"
exec "$comflp_root/run.sh" "${recipe_options[@]}" "$@"
