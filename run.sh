#!/usr/bin/env bash
# comflp stage driver: data -> baseline -> layer correlation -> pruning search -> decoding.
# With no corpus options it synthesises the built-in English corpus and runs on it.
#   ./run.sh [--stage N] [--stop_stage M] [--name value ...]      (./run.sh --help lists options)
# Per-corpus recipes (egs/*/run.sh) call this script from their own directory: data/ and exp/
# are always relative to the current directory.
set -euo pipefail
run_command="$0 $*"
comflp_root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- general ----
stage=0                 # first stage to run
stop_stage=8            # last stage to run
nj=2                    # parallel jobs for data preparation and feature extraction
# ---- corpus (stage 0) ----
corpus=builtin          # builtin (espeak-ng synthesis) | librispeech | aishell | kaldi
corpus_dir=             # corpus location (kaldi: one data dir per subset); builtin default: data/builtin_corpus
download=false          # librispeech, aishell: download with lhotse first (corpus_dir must end in LibriSpeech or aishell)
download_url=http://www.openslr.org/resources  # OpenSLR or a mirror
speed_perturb=false     # stage 1: add 0.9x and 1.1x speed copies of the training set
train_set=train-clean-100
dev_set=dev-clean
test_sets=test-clean    # space-separated
num_train=8000          # builtin corpus: utterances per subset
num_dev=200
num_test=200
corpus_seed=0           # builtin corpus: same seed, same corpus
# ---- features and units (stages 1-2) ----
max_utt_duration=20     # seconds; longer utterances are dropped
token_type=char         # bpe | char
nbpe=256                # BPE vocabulary size
# ---- training (stage 3) ----
train_config=conf/train.yaml
exp_dir=exp/baseline    # the baseline's experiment directory
resume=true             # continue from the latest checkpoint when there is one
device=auto             # auto | cpu | cuda
ngpu=0                  # GPUs per training job; > 1 trains with DDP (nccl) through torchrun
nproc=1                 # CPU training processes when ngpu=0; > 1 trains with DDP (gloo), cores shared out as threads
train_threads=0         # CPU cores for a training job when ngpu=0 (0: all of this machine's); Slurm: --cpus-per-task
train_args=             # extra arguments for bin/train.py, e.g. "--set train.num_epochs=2"
# ---- model to prune (stages 4-8) ----
model_type=native       # native (comflp's own, stage 3) | hf | whisper | ctranslate2 | espnet (names from the model-type registry)
model_dir=              # the model to prune (default: exp_dir, a native model); ctranslate2: tiny.en names the packaged tiny.en
ct2_quantization=auto   # ctranslate2: weights of the CTranslate2 models written (auto: as the input)
stack=encoder           # the layer stacks stages 4-8 prune: encoder | decoder | "encoder decoder" (both: the encoder, then the decoder of its chain_search choice)
decoder_num_prune=      # with both stacks: the decoder's P (default: num_prune)
chain_search=comflp     # with both stacks: the encoder search whose pruned model the decoder stages prune
# ---- layer dump (stage 4) ----
calib_set=              # set the calibration subset is drawn from (default: the training set)
calib_num_utts=320      # calibration utterances (CoMFLP: 10 batches of 32)
pooling=frames          # frames | mean (utterance level, CoMFLP's); residual_sum needs frames
frames_per_utt=25       # frames pooling: random frames kept per utterance (0: all)
# ---- scores (stage 5) ----
scores="residual_sum dc consensus"  # coarse scores, each built once (consensus: of the others); stage 6 merges the consensus's top K and each other score's first score_top_k (docs/SEARCH_QUALITY.md)
score_conf=""           # scores' options, SCORE.OPTION=VALUE separated by spaces (dc.batch_size=8); each score's defaults: its Options in comflp/prune/scores/
# ---- searches (stage 6) ----
num_prune="6"           # layers to prune: values ("2 4 6"), all (1..L-1) or ranges A:B[:STEP]
search_methods="comflp glp oracle"  # CoMFLP (coarse searches of every score, one fine search), GLP (greedy), the exhaustive oracle
search_mode=beam        # coarse search: beam | greedy | exhaustive
coarse_aggregation=mean  # matrix scores: mean (CoMFLP: mean block correlation) | damage (minus summed 1 - correlation)
beam_size=10            # coarse beam search: beam width
top_k=10                # coarse proposals passed to the fine search: the consensus's, else each score's
score_top_k=1           # with the consensus among the scores, each other score's own coarse proposals joining the merge
fine_rules=drop_top     # fixed rules whose proposal joins the fine search, one evaluation each ("": none)
refine=auto             # auto | never | always: one-swap local search after the fine search (auto: where the consensus's evaluated top K does not order the metric, Spearman >= 0)
fine_metric=cer         # cer | wer | loss (the model's own: CTC, or cross-entropy without CTC)
fine_num_utts=320       # dev utterances the metric is measured on (at most the dev set's)
prefix_cache=true       # metric searches: compute the layers candidates share once
oracle_max_evaluations=1000  # oracle: only when C(L, P) is at most this
# ---- comparison and decoding (stage 7) ----
random_seeds=5          # random layer selections per P
rules=all               # fixed rules in the table (all: every one that fits the stack and model)
decoding_method=ctc_greedy_search  # a method the model has: ctc_greedy_search | ctc_prefix_beam_search | attention_rescoring, attention_greedy_search (native AED) | espnet_beam_search (espnet)
decode_beam_size=10     # beam of the beam searches
decode_nj=2             # decoding jobs per set (a job array)
score_metrics="wer cer" # error rates in RESULTS.md (Mandarin: cer)
# ---- fine-tuning (stage 8) ----
finetune_config=conf/finetune.yaml
finetune_search=comflp  # the search whose choice is fine-tuned
# ---- structured pruning (stage 9) ----
sp_config=conf/structured.yaml
sp_target_sparsity=0.5  # fractions of the encoder layers' parameters to remove; several values allowed

help_message="Usage: $0 [--stage N] [--stop_stage M] [--name value ...]
Stages: 0 data preparation, 1 features, 2 tokenizer, 3 train the baseline,
4 dump layer outputs, 5 scores, 6 searches (CoMFLP coarse + fine, GLP, oracle),
7 compare layer-selection methods (decode, score, RESULTS.md), 8 fine-tune the pruned model,
9 L0 structured pruning with distillation (rows beside 8's).
Options (defaults in brackets):
$(sed -n '/^# ---- general/,/^sp_target_sparsity=/p' "$0" | grep -E '^[a-z_]+=' | sed -E 's/^([a-z_]+)=("[^"]*"|[^ ]*) *#? ?(.*)$/  --\1 [\2] \3/')"

. "$comflp_root/utils/parse_options.sh"
. "$comflp_root/utils/log.sh"
"$comflp_root/utils/setup.sh" --quiet  # set up on first use; instant once done
. "$comflp_root/path.sh"
if [ -f ./cmd.sh ]; then . ./cmd.sh; else . "$comflp_root/cmd.sh"; fi

[[ $stage =~ ^[0-9]+$ && $stop_stage =~ ^[0-9]+$ ]] || die "--stage and --stop_stage must be integers (got '$stage', '$stop_stage')"
[[ $ngpu =~ ^[0-9]+$ && $nproc =~ ^[1-9][0-9]*$ ]] || die "--ngpu must be >= 0 and --nproc >= 1 (got '$ngpu', '$nproc')"
[ "$stop_stage" -ge "$stage" ] || die "--stop_stage ($stop_stage) is smaller than --stage ($stage): nothing to run"
case $corpus in
  builtin) corpus_dir=${corpus_dir:-data/builtin_corpus}
    [ "$download" = false ] || die "--download true needs --corpus librispeech or aishell (the built-in corpus is synthesised)" ;;
  librispeech|aishell|kaldi) [ -n "$corpus_dir" ] || die "--corpus $corpus needs --corpus_dir" ;;
  *) die "--corpus must be builtin, librispeech, aishell or kaldi, got '$corpus'" ;;
esac
case $stack in
  encoder|decoder|"encoder decoder") ;;
  *) die "--stack must be encoder, decoder or \"encoder decoder\", got '$stack'" ;;
esac
stacks=$stack
if [ "$stacks" = "encoder decoder" ]; then
  [[ $num_prune =~ ^[0-9]+$ ]] || die "--stack \"encoder decoder\" prunes the decoder of one encoder-pruned model: --num_prune must be one number, got '$num_prune'"
fi
case $token_type in
  bpe) lang_dir=data/lang_bpe${nbpe} ;;
  char) lang_dir=data/lang_char ;;
  *) die "--token_type must be bpe or char, got '$token_type'" ;;
esac
if [ "$stop_stage" -ge 4 ]; then  # the closed-set options of stages 4-9, before any job starts
  if ! check=$(python "$comflp_root/bin/check_options.py" --model_type "$model_type" \
    --scores "$scores" --search_methods "$search_methods" --rules "$rules" \
    --fine_rules "$fine_rules" --refine "$refine" \
    --fine_metric "$fine_metric" --search_mode "$search_mode" \
    --coarse_aggregation "$coarse_aggregation" --decoding_method "$decoding_method" \
    --ct2_quantization "$ct2_quantization" --score_conf "$score_conf" 2>&1); then
    grep -v ' INFO ' <<<"$check" >&2
    exit 1
  fi
fi
all_sets="$train_set $dev_set $test_sets"
train_cuts=data/fbank/cuts_${train_set}.jsonl.gz
dev_cuts=data/fbank/cuts_${dev_set}.jsonl.gz
bin=$comflp_root/bin
log_dir=exp/log

run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

# Training jobs (stages 3 and 8): one process, or torchrun with one process per GPU / CPU slot.
if [ "$ngpu" -gt 0 ]; then
  train_job="$cuda_cmd --gpu $ngpu"
  procs=$ngpu
else
  [[ $train_threads =~ ^[0-9]+$ ]] || die "--train_threads must be an integer >= 0 (got '$train_threads')"
  [ "$train_threads" -gt 0 ] || train_threads=$(nproc)
  train_job="$train_cmd --num_threads $train_threads"
  procs=$nproc
fi
if [ "$procs" -gt 1 ]; then
  train_python=(python -m torch.distributed.run --standalone --nproc_per_node "$procs")
else
  train_python=(python)
fi

# ---- model type espnet (begin): stages 4-8 run with .venv-espnet's python ----
# ESPnet2 needs torch/torchaudio 2.11 in an environment of its own (utils/setup.sh --espnet),
# set up here on first use; every other model type runs with .venv's python.
stage_python=python
if [ "$model_type" = espnet ] && [ "$stage" -le 8 ] && [ "$stop_stage" -ge 4 ]; then
  setup_log=$(mktemp)
  "$comflp_root/utils/setup.sh" --quiet --espnet >"$setup_log" 2>&1 \
    || die "--model_type espnet: could not set up ESPnet's environment .venv-espnet (output in $setup_log); run: $comflp_root/utils/setup.sh --espnet"
  rm -f "$setup_log"
  stage_python=${COMFLP_ESPNET_VENV:-$comflp_root/.venv-espnet}/bin/python
  train_python=("$stage_python")  # stage 8 fine-tunes through the adapter, in one process
fi
# ---- model type espnet (end) ----

if run_stage 0; then
  log "Stage 0: data preparation ($corpus corpus in $corpus_dir)"
  if [ "$corpus" = builtin ]; then
    $train_cmd $log_dir/make_corpus.log \
      python "$comflp_root/local/make_corpus.py" --corpus_dir "$corpus_dir" \
        --num_train "$num_train" --num_dev "$num_dev" --num_test "$num_test" \
        --corpus_seed "$corpus_seed" --nj "$nj"
  fi
  layout=$corpus; [ "$corpus" = builtin ] && layout=librispeech  # the built-in corpus is in LibriSpeech's layout
  $train_cmd $log_dir/prepare_data.log \
    python "$bin/prepare_data.py" --layout "$layout" --corpus_dir "$corpus_dir" \
      --subsets "$all_sets" --download "$download" --download_url "$download_url" \
      --output_dir data/manifests --nj "$nj"
fi

if run_stage 1; then
  log "Stage 1: 80-dim fbank in $nj parts, length filtering, global CMVN"
  $train_cmd JOB=1:"$nj" $log_dir/compute_fbank.JOB.log \
    python "$bin/compute_fbank.py" --manifest_dir data/manifests --output_dir data/fbank \
      --subsets "$all_sets" --train_set "$train_set" --max_utt_duration "$max_utt_duration" \
      --speed_perturb "$speed_perturb" --part JOB --num_parts "$nj"
  $train_cmd $log_dir/merge_fbank.log \
    python "$bin/merge_fbank.py" --output_dir data/fbank --subsets "$all_sets" --train_set "$train_set" \
      --num_parts "$nj"
fi

if run_stage 2; then
  log "Stage 2: $token_type tokenizer into $lang_dir"
  $train_cmd $log_dir/train_tokenizer.log \
    python "$bin/train_tokenizer.py" --cuts "$train_cuts" \
      --output_dir "$lang_dir" --token_type "$token_type" --nbpe "$nbpe"
fi

if run_stage 3; then
  log "Stage 3: train the baseline with $train_config into $exp_dir"
  # shellcheck disable=SC2086  # train_args holds several words on purpose
  $train_job "$exp_dir/log/train.log" \
    "${train_python[@]}" "$bin/train.py" --train_config "$train_config" --exp_dir "$exp_dir" \
      --train_cuts "$train_cuts" --dev_cuts "$dev_cuts" \
      --lang_dir "$lang_dir" --cmvn data/fbank/cmvn.json --resume "$resume" --device "$device" $train_args
  log "Stage 3 done: $exp_dir/model.pt, curves in $exp_dir/training_curves.png"
fi

calib_set=${calib_set:-$train_set}
# The model stages 4-6 of a stack prune, and its P values: with both stacks, the decoder's
# model is the encoder-pruned one that chain_search chose.
stack_model_dir() {
  if [ "$1" = decoder ] && [ "$stacks" = "encoder decoder" ]; then
    echo "$exp_dir/search/${chain_search}_prune$num_prune/pruned"
  else
    echo "${model_dir:-$exp_dir}"
  fi
}
stack_num_prune() {
  if [ "$1" = decoder ] && [ "$stacks" = "encoder decoder" ] && [ -n "$decoder_num_prune" ]; then
    echo "$decoder_num_prune"
  else
    echo "$num_prune"
  fi
}
set_stack() {  # set_stack STACK: the options of the stages that work on one stack
  stack=$1
  stack_log=${1#encoder}  # log names: the encoder's as before, the decoder's with _decoder
  stack_log=${stack_log:+_$stack_log}
  stack_dir=$(stack_model_dir "$1")
  stack_prunes=$(stack_num_prune "$1")
  model_args=(--exp_dir "$exp_dir" --model_type "$model_type" --model_dir "$stack_dir"
    --stack "$stack" --device "$device" --ct2_quantization "$ct2_quantization")
  search_args=(--num_prune "$stack_prunes" --scores "$scores" --search_mode "$search_mode"
    --coarse_aggregation "$coarse_aggregation" --beam_size "$beam_size" --top_k "$top_k"
    --score_top_k "$score_top_k" --refine "$refine" --fine_rules "$fine_rules" --fine_metric "$fine_metric" --fine_num_utts "$fine_num_utts" --prefix_cache "$prefix_cache"
    --oracle_max_evaluations "$oracle_max_evaluations" --dev_cuts "$dev_cuts")
}

for one_stack in $stacks; do
  set_stack "$one_stack"
  if run_stage 4; then
    log "Stage 4: dump the $stack layers of $stack_dir, $calib_num_utts utterances of $calib_set, into $exp_dir ($nj parts)"
    $train_cmd JOB=1:"$nj" "$exp_dir/log/dump_layers$stack_log.JOB.log" \
      "$stage_python" "$bin/dump_layers.py" "${model_args[@]}" --cuts "data/fbank/cuts_${calib_set}.jsonl.gz" \
        --calib_num_utts "$calib_num_utts" --pooling "$pooling" --frames_per_utt "$frames_per_utt" \
        --part JOB --num_parts "$nj"
    $train_cmd "$exp_dir/log/merge_dump$stack_log.log" \
      "$stage_python" "$bin/merge_dump.py" --exp_dir "$exp_dir" --stack "$stack" --num_parts "$nj"
  fi

  if run_stage 5; then
    log "Stage 5: scores $scores of the $stack dump of $exp_dir"
    $train_cmd "$exp_dir/log/scores$stack_log.log" \
      "$stage_python" "$bin/scores.py" --exp_dir "$exp_dir" --stack "$stack" --scores "$scores" \
        --score_conf "$score_conf"
  fi

  if run_stage 6; then
    for method in $search_methods; do
      log "Stage 6: $method search of the $stack, P in {$stack_prunes} ($fine_metric on up to $fine_num_utts dev utterances)"
      $train_cmd "$exp_dir/log/search${stack_log}_$method.log" \
        "$stage_python" "$bin/search.py" "${model_args[@]}" "${search_args[@]}" --search_methods "$method"
    done
  fi
done

compare_dir=$exp_dir/compare
eval_sets="$dev_set $test_sets"

decode_and_score() {  # decode_and_score STAGE METHOD_LIST: decode every eval set, then rebuild the table
  local set cuts=()
  for set in $eval_sets; do cuts+=("data/fbank/cuts_${set}.jsonl.gz"); done
  log "Stage $1: decoding $eval_sets with $decoding_method ($decode_nj parts, each model loaded once per part)"
  $decode_cmd JOB=1:"$decode_nj" "$compare_dir/log/decode_$2.JOB.log" \
    "$stage_python" "$bin/decode.py" --exp_dir "$exp_dir" --method_list "$2" --eval_sets "$eval_sets" \
      --cuts "${cuts[*]}" --part JOB --num_parts "$decode_nj" \
      --decoding_method "$decoding_method" --decode_beam_size "$decode_beam_size" --device "$device"
  $train_cmd "$compare_dir/log/results.log" \
    "$stage_python" "$bin/results.py" --exp_dir "$exp_dir" --eval_sets "$eval_sets" \
      --score_metrics "$score_metrics" --command "$run_command"
}

if run_stage 7; then
  log "Stage 7: layers chosen by each method for P in {$num_prune} ($stacks), decoding, scoring"
  set_stack "${stacks%% *}"
  $train_cmd "$compare_dir/log/list_methods.log" \
    "$stage_python" "$bin/list_methods.py" --exp_dir "$exp_dir" --model_type "$model_type" \
      --model_dir "$stack_dir" --device "$device" --stack "$stacks" "${search_args[@]}" \
      --decoder_num_prune "$decoder_num_prune" --search_methods "$search_methods" \
      --random_seeds "$random_seeds" --rules "$rules"
  decode_and_score 7 compare
  log "Stage 7 done: $exp_dir/RESULTS.md"
fi

if run_stage 8; then
  set_stack "${stacks##* }"  # with both stacks: the decoder of the encoder-pruned model
  log "Stage 8: fine-tune the $finetune_search choice of the $stack for P in {$stack_prunes} with $finetune_config"
  $train_job "$exp_dir/log/finetune.log" \
    "${train_python[@]}" "$bin/finetune.py" "${model_args[@]}" --num_prune "$stack_prunes" \
      --finetune_config "$finetune_config" --finetune_search "$finetune_search" \
      --train_cuts "$train_cuts" --dev_cuts "$dev_cuts" --resume "$resume"
  decode_and_score 8 finetune
  log "Stage 8 done: fine-tuned rows added to $exp_dir/RESULTS.md"
fi

if run_stage 9; then
  set_stack "${stacks%% *}"  # the unpruned model
  log "Stage 9: L0 structured pruning of $stack_dir to sparsity {$sp_target_sparsity} with $sp_config"
  $train_job "$exp_dir/log/structured.log" \
    python "$bin/structured_prune.py" "${model_args[@]}" --sp_config "$sp_config" \
      --sp_target_sparsity "$sp_target_sparsity" --train_cuts "$train_cuts" --dev_cuts "$dev_cuts" \
      --resume "$resume"
  decode_and_score 9 structured
  log "Stage 9 done: structured rows added to $exp_dir/RESULTS.md"
fi

log "Finished stages $stage..$stop_stage"
