#!/usr/bin/env bash
# Slot filling on the Schema-Guided Dialogue corpus (SGD, CC BY-SA 4.0), every turn spoken by
# espeak-ng; the test set is upstream dev, scored on seen and unseen services. Stages: see sf.sh.
#   ./run.sh --sgd_root /path/to/sgd        # default: Whisper base + SmolLM2-135M, real weights, CPU
#   ./run.sh --preset mini --sgd_root ...   # CI-sized: a few dialogues, tiny models built from configs
#   ./run.sh                                # online: downloads the upstream release into downloads/
set -euo pipefail

[ -f ../../../tools/venv/.installed ] || ../../../tools/install.sh

SF_COMMAND=$(printf '%q ' "$0" "$@")  # recorded in RESULTS.md, quoted so that it can be run again
export SF_COMMAND="${SF_COMMAND% }"
# --sgd_root is this recipe's own flag; it reaches local/data.sh through db.sh's SGD variable
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sgd_root) export SGD=$2; shift 2 ;;
    --sgd_root=*) export SGD=${1#--sgd_root=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
# dialogue counts are local/data.sh's defaults; presets and --local_data_opts change them
./sf.sh \
  --train_set train --valid_set valid --test_sets dev \
  "${args[@]}"
