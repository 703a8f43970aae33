#!/usr/bin/env bash
# speechllm-bench on this recipe's data, configs and trained models: exp/bench/bench.json and bench.md.
#
#   local/bench.sh [--preset mini] [--llm smollm2_135m] [--mode reasoning] [--set test] [--utts 16]
#
# Stages 0-3 must have run for the LLM and mode (the decoding and training sections use the trained
# experiment, its tokenised training set and its train.yaml). The preset gives the Whisper and the LLM,
# as for run.sh; flags given explicitly win.
set -euo pipefail
. utils/log.sh

preset=""
whisper=base
llm=smollm2_135m
mode=reasoning       # the experiment to measure (exp/<llm>_<mode><tag>); reasoning is the longest to decode
tag=""
set=test             # stage 1's turns (data/<set>) and decoding's rows (dump/<set>/<mode>.jsonl)
utts=16              # turns of stage 1, examples of decoding
batch_size=8         # decoding's batch
train_steps=8
startup_rows=100000  # generated rows of the start-up section (several: "1000 100000")
sections="machine stage1 training decoding memory startup"
outdir=exp/bench
__po_free="startup_rows"  # a list, though its default looks like one integer
help_message="Usage: $0 [--option value ...]. Options and their defaults:
$(sed -n '/^preset=/,/^outdir=/p' "$0")"

. utils/apply_preset.sh "$@"  # before the flags, which override it
. utils/parse_options.sh
. ./path.sh

exp_dir=exp/${llm}_${mode}${tag:+_${tag}}
if [ "$(python -m speechllm.bin.modes "${mode}")" != "${mode}" ]; then  # checks --mode: one, not a list or all
  log "Error: bench measures one mode, not '${mode}'"; exit 1
fi
row_mode=${mode}
[ "${mode}" != hybrid ] || row_mode=hybrid_think  # a hybrid model is measured on its /think rows
log "speechllm-bench of ${exp_dir} on ${set} -> ${outdir}"
# shellcheck disable=SC2086
python -m speechllm.bin.bench --outdir "${outdir}" --sections ${sections} --whisper "${whisper}" \
  --wav_scp "data/${set}/wav.scp" --text "data/${set}/text" --exp_dir "${exp_dir}" --test_jsonl "dump/${set}/${mode}.jsonl" \
  --mode "${row_mode}" --llm_config "conf/llm/${llm}.yaml" --utts "${utts}" --batch_size "${batch_size}" \
  --train_steps "${train_steps}" --startup_rows ${startup_rows}
