#!/usr/bin/env bash
# The paper's experiment grid: stages 3-5 for every foundation LLM x mode (each through cmd.sh, like
# any run.sh call), then one RESULTS.md over all of them: Table 1 (regular vs reasoning), Table 2
# (hybrid vs single-mode), the cascade baseline and a bar chart of F1 per LLM and mode.
#
#   local/run_grid.sh [--llms "qwen3_0_6b qwen3_4b"] [--modes "regular reasoning hybrid cascade"] \
#                     [--results_md RESULTS.md] [run.sh options, e.g. --preset mini --ngpu 4]
#
# Stages 0-2 must have run (./run.sh --stop_stage 2). Every run keeps its own exp dir, so the grid
# can be extended later and rerun: finished models are retrained only if their exp dir is removed.
set -euo pipefail
. utils/log.sh
. ./path.sh

llms="llama32_1b_instruct llama31_8b_instruct llama31_8b deepseek_r1_distill_llama8b qwen3_0_6b qwen3_4b phi4_mini_reasoning"
modes="regular reasoning hybrid cascade"
results_md=RESULTS.md
run_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --llms) llms=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --results_md) results_md=$2; shift 2 ;;
    --help|-h) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) run_args+=("$1"); shift ;;
  esac
done

for llm in ${llms}; do
  [ -f "conf/llm/${llm}.yaml" ] || { log "Error: unknown LLM '${llm}'. Available: $(ls conf/llm | sed -n 's/\.yaml$//p' | tr '\n' ' ')"; exit 1; }
done

decode_dirs=()
for llm in ${llms}; do
  for mode in ${modes}; do
    exp=exp/${llm}_${mode}
    if [ -f "${exp}/model/speechllm.yaml" ] && ls "${exp}"/decode_*/score/scores.json > /dev/null 2>&1; then
      log "grid: ${llm} ${mode} already scored in ${exp} (remove it to retrain)"
    else
      log "grid: ${llm} ${mode} -> ${exp}"
      ./run.sh "${run_args[@]}" --stage 3 --stop_stage 5 --llm "${llm}" --mode "${mode}" \
        --results_md "${exp}/RESULTS.md"
    fi
    for d in "${exp}"/decode_*; do
      [ -f "${d}/score/scores.json" ] && decode_dirs+=("${d}")
    done
  done
done

log "grid: ${#decode_dirs[@]} scored decode dirs -> ${results_md}"
python -m speechllm.bin.results --decode_dirs "${decode_dirs[@]}" --stage_times exp/stage_times.tsv \
  --command "local/run_grid.sh --llms \"${llms}\" --modes \"${modes}\" ${run_args[*]}" \
  --output "${results_md}" --plot "${results_md%.md}_f1.png" > /dev/null
log "grid: done; see ${results_md} and ${results_md%.md}_f1.png"
