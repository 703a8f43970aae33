# Environment of the recipe: the toolkit's virtualenv and package.
MAIN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
if [ -f "${MAIN_ROOT}/tools/venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "${MAIN_ROOT}/tools/venv/bin/activate"
else
  echo "path.sh: ${MAIN_ROOT}/tools/venv is missing: run ${MAIN_ROOT}/tools/install.sh" >&2
fi
export PYTHONPATH=${MAIN_ROOT}${PYTHONPATH:+:${PYTHONPATH}}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export MODEL_CACHE=${MODEL_CACHE:-${MAIN_ROOT}/tools/models}
