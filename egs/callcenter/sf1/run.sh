#!/usr/bin/env bash
# Call-centre slot filling (synthetic calls spoken by espeak-ng). Stages: see sf.sh.
#   ./run.sh                      # default: Whisper base + SmolLM2-135M, all four modes + cascade, 2-core CPU
#   ./run.sh --preset mini        # CI-sized: tiny models built from configs, a few minutes on CPU
#   ./run.sh --preset long        # a few hours of CPU; --preset gpu: the paper's settings on a GPU
#   ./run.sh --stage 3 --llm llama31_8b --mode reasoning
#   local/run_grid.sh --llms "qwen3_0_6b qwen3_4b"   # the paper's LLM x mode grid: exp/RESULTS_grid.md
set -euo pipefail

[ -f ../../../tools/venv/.installed ] || ../../../tools/install.sh

SF_COMMAND=$(printf '%q ' "$0" "$@")  # recorded in RESULTS.md, quoted so that it can be run again
export SF_COMMAND="${SF_COMMAND% }"
# corpus sizes are local/data.sh's defaults; presets and --local_data_opts change them
./sf.sh \
  --train_set train --valid_set dev --test_sets test \
  "$@"
