# Logging helpers for shell scripts: log MESSAGE, die MESSAGE.
log() {
  echo "$(date '+%Y-%m-%d %H:%M:%S') ($(basename "$0"):${BASH_LINENO[0]}) $*" >&2
}
die() {
  echo "$(date '+%Y-%m-%d %H:%M:%S') ($(basename "$0")) ERROR: $*" >&2
  exit 1
}
