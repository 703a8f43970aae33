#!/usr/bin/env bash
# Stage 0 of the call-centre recipe: generate seeded calls, speak them with espeak-ng, and write
# Kaldi-style data dirs data/{train,dev,test}.
set -euo pipefail

. utils/log.sh

num_calls=50
num_dev=4
num_test=6
seed=1
nj=2
. ./db.sh
. utils/parse_options.sh

log "generating ${num_calls} calls (seed ${seed}) in ${CALLCENTER}"
python -m speechllm.corpus.callcenter --outdir "${CALLCENTER}" --num_calls "${num_calls}" \
  --num_dev "${num_dev}" --num_test "${num_test}" --seed "${seed}"
log "speaking them with espeak-ng into data/"
python -m speechllm.corpus.synth --conversations "${CALLCENTER}/conversations.jsonl" \
  --inventory "${CALLCENTER}/slot_inventory.json" --wavdir "${CALLCENTER}/wav_seed${seed}" \
  --datadir data --nj "${nj}" --seed "${seed}"
