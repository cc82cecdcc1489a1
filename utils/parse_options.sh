# Source after declaring a script's defaults: turns "--name value" and "--name=value" into
# variable assignments (dashes in a name become underscores). Only variables the script
# already defined, with lower-case names, are options; anything else is refused.
# "--help" prints $help_message. Positional arguments are refused.
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      echo "${help_message:-Usage: $0 [--name value ...]}"
      exit 0 ;;
    --*=*)
      __opt=${1%%=*}; __value=${1#*=}; shift ;;
    --*)
      if [ $# -lt 2 ]; then
        echo "$0: option $1 needs a value" >&2; exit 1
      fi
      __opt=$1; __value=$2; shift 2 ;;
    *)
      echo "$0: unexpected argument '$1' (options are --name value; see $0 --help)" >&2
      exit 1 ;;
  esac
  __name=${__opt#--}; __name=${__name//-/_}
  if ! [[ $__name =~ ^[a-z][a-z0-9_]*$ ]] || [ -z "${!__name+set}" ]; then
    echo "$0: unknown option $__opt (see $0 --help)" >&2
    exit 1
  fi
  printf -v "$__name" '%s' "$__value"
done
unset __opt __value __name
