#!/usr/bin/env bash
# The paper's experiment grid: stages 3-5 for every foundation LLM x mode (each through cmd.sh, like
# any run.sh call), then one RESULTS.md over all of them: Table 1 (regular vs reasoning), Table 2
# (hybrid vs single-mode), the cascade baseline and a bar chart of F1 per LLM and mode.
#
#   local/run_grid.sh [--llms "qwen3_0_6b qwen3_4b"] [--modes "regular reasoning hybrid cascade"] [--tag x] \
#                     [--results_md exp/RESULTS_grid.md] [run.sh options, e.g. --preset mini --ngpu 4]
#
# Stages 0-2 must have run (./run.sh --stop_stage 2). A run is found by the identity its scores.json
# records (LLM, mode, tag), so the grid can be extended later and rerun: runs already scored are
# skipped (remove their exp dir to retrain them). Each run also writes its own tables, into
# <results_md without .md>_runs/.
set -euo pipefail
. utils/log.sh
. ./path.sh

grid_command=$(printf '%q ' "$0" "$@")  # recorded in the grid's RESULTS, quoted so that it can be run again
llms="llama32_1b_instruct llama31_8b_instruct llama31_8b deepseek_r1_distill_llama8b qwen3_0_6b qwen3_4b phi4_mini_reasoning"
modes=all
tag=""
results_md=exp/RESULTS_grid.md
run_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --llms|--modes|--tag|--results_md)
      [[ $# -ge 2 ]] || { log "Error: $1 needs a value"; exit 1; }
      printf -v "${1#--}" '%s' "$2"; shift 2 ;;
    --llms=*|--modes=*|--tag=*|--results_md=*) name=${1%%=*}; printf -v "${name#--}" '%s' "${1#*=}"; shift ;;
    --help|-h) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) run_args+=("$1"); shift ;;
  esac
done

for llm in ${llms}; do
  [ -f "conf/llm/${llm}.yaml" ] || { log "Error: unknown LLM '${llm}'. Available: $(ls conf/llm | sed -n 's/\.yaml$//p' | tr '\n' ' ')"; exit 1; }
done
modes=$(python -m speechllm.bin.modes ${modes})  # checks the modes and expands all

shopt -s nullglob
scored() {  # scored <results.py filters>: the decode dirs of the grid's runs among those scored under exp/
  local files=(exp/*/*/score/scores.json)
  python -m speechllm.bin.results --decode_dirs "${files[@]%/score/scores.json}" --tag "${tag}" "$@"
}

for llm in ${llms}; do
  for mode in ${modes}; do
    found=$(scored --list --llms "${llm}" --modes "${mode}")
    if [ -n "${found}" ]; then
      log "grid: ${llm} ${mode}${tag:+ ${tag}} already scored in $(dirname "${found%%$'\n'*}") (remove it to retrain)"
    else
      log "grid: training ${llm} ${mode}${tag:+ ${tag}}"
      ./run.sh "${run_args[@]}" --stage 3 --stop_stage 5 --llm "${llm}" --mode "${mode}" --tag "${tag}" \
        --results_md "${results_md%.md}_runs/${llm}_${mode}${tag:+_${tag}}.md"
    fi
  done
done

log "grid: writing ${results_md}"
scored --llms ${llms} --modes ${modes} --stage_times exp/stage_times.tsv \
  --command "${grid_command% }" \
  --output "${results_md}" --plot "${results_md%.md}_f1.png" > /dev/null
log "grid: done; see ${results_md} and ${results_md%.md}_f1.png"
