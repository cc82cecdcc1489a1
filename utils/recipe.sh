# The stage loop of the recipes whose model comes from another library (egs/espnet,
# egs/wav2vec2, egs/whisper, egs/whisper_scratch), sourced by their run.sh after they set:
#   recipe_dir, comflp_root      the recipe's directory and the repository's
#   recipe_options=(...)         driver options that replace ../../run.sh's defaults
#   stacks="encoder [decoder]"   the stacks stages 4-7 prune, each in exp/<stack>/; stages 8-9
#                                run on the last of these only (also when --stacks names others)
#   train_model (a function)     stage 3, which trains the model into $model_dir with
#                                $train_args (none: the model is given)
#   stop_stage (optional)        the default last stage, if not 9
# then call `recipe_main "$@"`. Stages 0-1 (the built-in corpus, fbank) and 4-9 are the
# driver's (no stage 2: each model brings its own tokens); --stage, --stop_stage, --stacks
# and --train_args are the recipe's, --model_dir is both stage 3's and the driver's; every
# other option goes to the driver and wins over recipe_options. After recipe_main, $stage and
# $stop_stage hold the range asked for (a recipe's own steps after the driver's use them).

recipe_driver() { "$comflp_root/run.sh" "${recipe_options[@]}" "$@" "${recipe_args[@]}"; }

recipe_main() {
  local first last stack final_stack=${stacks##* }
  stage=0
  stop_stage=${stop_stage:-9}
  recipe_args=()
  while [ $# -gt 0 ]; do
    case $1 in
      --stage) stage=$2; shift 2 ;;
      --stop_stage) stop_stage=$2; shift 2 ;;
      --stacks) stacks=$2; shift 2 ;;
      --train_args) train_args=$2; shift 2 ;;
      --model_dir) model_dir=$2; recipe_args+=("$1" "$2"); shift 2 ;;
      --help|-h)
        sed -n '2,/^set -euo/p' "$0" | sed '$d'
        echo "Recipe options: --stage, --stop_stage (0-9), --stacks (default: $stacks)," \
          "--train_args (stage 3's, default: ${train_args:-none})."
        echo "Settings that replace the driver's defaults:"
        printf '  %s %s\n' "${recipe_options[@]}"
        echo
        exec "$comflp_root/run.sh" --help ;;
      *) recipe_args+=("$1"); shift ;;
    esac
  done
  cd "$recipe_dir"
  if [ "$stage" -le 1 ]; then
    recipe_driver --stage "$stage" --stop_stage $((stop_stage < 1 ? stop_stage : 1))
  fi
  if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ] && declare -F train_model >/dev/null; then
    echo "$(date '+%F %T') (recipe) Stage 3: train_model, log in exp/log/train_model.log"
    mkdir -p exp/log
    "$comflp_root/utils/setup.sh" --quiet
    train_model >exp/log/train_model.log 2>&1 || {
      tail -n 5 exp/log/train_model.log >&2
      echo "Stage 3 failed; the whole log: exp/log/train_model.log" >&2
      exit 1
    }
  fi
  for stack in $stacks; do
    first=$((stage > 4 ? stage : 4))
    last=$stop_stage
    [ "$stack" = "$final_stack" ] || last=$((stop_stage < 7 ? stop_stage : 7))
    if [ "$last" -ge "$first" ]; then
      recipe_driver --stage "$first" --stop_stage "$last" --stack "$stack" --exp_dir "exp/$stack"
    fi
  done
}
