#!/usr/bin/env bash
# comflp stage driver: data -> baseline -> layer correlation -> pruning search -> decoding.
# With no corpus options it synthesises the built-in English corpus and runs on it.
#   ./run.sh [--stage N] [--stop_stage M] [--name value ...]      (./run.sh --help lists options)
# Per-corpus recipes (egs/*/run.sh) call this script from their own directory: data/ and exp/
# are always relative to the current directory.
set -euo pipefail
comflp_root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- general ----
stage=0                 # first stage to run
stop_stage=3            # last stage to run
nj=2                    # parallel jobs for data preparation and feature extraction
# ---- corpus (stage 0) ----
corpus=builtin          # builtin (espeak-ng synthesis) | librispeech
corpus_dir=             # corpus location; builtin default: data/builtin_corpus
train_set=train-clean-100
dev_set=dev-clean
test_sets=test-clean    # space-separated
num_train=3000          # builtin corpus: utterances per subset
num_dev=200
num_test=200
corpus_seed=0           # builtin corpus: same seed, same corpus
# ---- features and units (stages 1-2) ----
max_utt_duration=20     # seconds; longer utterances are dropped
token_type=bpe          # bpe | char
nbpe=256                # BPE vocabulary size
# ---- training (stage 3) ----
train_config=conf/train.yaml
exp_dir=exp/baseline    # the baseline's experiment directory
resume=true             # continue from the latest checkpoint when there is one
device=auto             # auto | cpu | cuda
train_args=             # extra arguments for bin/train.py, e.g. "--set train.num_epochs=2"

help_message="Usage: $0 [--stage N] [--stop_stage M] [--name value ...]
Stages: 0 data preparation, 1 features, 2 tokenizer, 3 train the baseline.
Options (defaults in brackets):
$(sed -n '/^# ---- general/,/^train_args=/p' "$0" | grep -E '^[a-z_]+=' | sed -E 's/^([a-z_]+)=("[^"]*"|[^ ]*) *#? ?(.*)$/  --\1 [\2] \3/')"

. "$comflp_root/utils/parse_options.sh"
. "$comflp_root/utils/log.sh"
. "$comflp_root/path.sh"
if [ -f ./cmd.sh ]; then . ./cmd.sh; else . "$comflp_root/cmd.sh"; fi

[[ $stage =~ ^[0-9]+$ && $stop_stage =~ ^[0-9]+$ ]] || die "--stage and --stop_stage must be integers (got '$stage', '$stop_stage')"
[ "$stop_stage" -ge "$stage" ] || die "--stop_stage ($stop_stage) is smaller than --stage ($stage): nothing to run"
case $corpus in
  builtin) corpus_dir=${corpus_dir:-data/builtin_corpus} ;;
  librispeech) [ -n "$corpus_dir" ] || die "--corpus $corpus needs --corpus_dir" ;;
  *) die "--corpus must be builtin or librispeech, got '$corpus'" ;;
esac
case $token_type in
  bpe) lang_dir=data/lang_bpe${nbpe} ;;
  char) lang_dir=data/lang_char ;;
  *) die "--token_type must be bpe or char, got '$token_type'" ;;
esac
all_sets="$train_set $dev_set $test_sets"
bin=$comflp_root/bin
log_dir=exp/log

run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

if run_stage 0; then
  log "Stage 0: data preparation ($corpus corpus in $corpus_dir)"
  if [ "$corpus" = builtin ]; then
    $train_cmd $log_dir/make_corpus.log \
      python "$comflp_root/local/make_corpus.py" --corpus_dir "$corpus_dir" \
        --num_train "$num_train" --num_dev "$num_dev" --num_test "$num_test" \
        --seed "$corpus_seed" --nj "$nj"
  fi
  $train_cmd $log_dir/prepare_data.log \
    python "$bin/prepare_data.py" --corpus librispeech --corpus_dir "$corpus_dir" \
      --subsets "$all_sets" --output_dir data/manifests --nj "$nj"
fi

if run_stage 1; then
  log "Stage 1: 80-dim fbank, length filtering, global CMVN"
  $train_cmd $log_dir/compute_fbank.log \
    python "$bin/compute_fbank.py" --manifest_dir data/manifests --output_dir data/fbank \
      --subsets "$all_sets" --train_set "$train_set" --max_utt_duration "$max_utt_duration" --nj "$nj"
fi

if run_stage 2; then
  log "Stage 2: $token_type tokenizer into $lang_dir"
  $train_cmd $log_dir/train_tokenizer.log \
    python "$bin/train_tokenizer.py" --cuts "data/fbank/cuts_${train_set}.jsonl.gz" \
      --output_dir "$lang_dir" --token_type "$token_type" --vocab_size "$nbpe"
fi

if run_stage 3; then
  log "Stage 3: train the baseline with $train_config into $exp_dir"
  # shellcheck disable=SC2086  # train_args holds several words on purpose
  $train_cmd "$exp_dir/log/train.log" \
    python "$bin/train.py" --config "$train_config" --exp_dir "$exp_dir" \
      --train_cuts "data/fbank/cuts_${train_set}.jsonl.gz" --dev_cuts "data/fbank/cuts_${dev_set}.jsonl.gz" \
      --lang_dir "$lang_dir" --cmvn data/fbank/cmvn.json --resume "$resume" --device "$device" $train_args
  log "Stage 3 done: $exp_dir/model.pt, curves in $exp_dir/training_curves.png"
fi

log "Finished stages $stage..$stop_stage"
