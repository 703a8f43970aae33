#!/usr/bin/env bash
# Stage 0 of the SGD recipe: select dialogues of the SGD release, convert their turns and slots
# (speechllm/corpus/sgd.py), speak them with espeak-ng and write Kaldi-style data dirs
# data/{train,valid,dev}. valid is held out from upstream train; dev (upstream dev) is the test set.
set -euo pipefail

. utils/log.sh

num_train=22           # training dialogues (-1: all of upstream train)
num_valid=2            # validation dialogues, held out from upstream train
num_test=6             # test dialogues of upstream dev, half with services unseen in training (-1: all)
prefix_collisions=false  # true: slot names shared by several domains become <domain>_<name>
seed=1
nj=2
. ./db.sh
sgd_root=${SGD}
. utils/parse_options.sh

download=()
[ "${sgd_root}" = "${SGD_DOWNLOAD}" ] && download=(--download)
log "reading SGD from ${sgd_root}: ${num_train} train, ${num_valid} valid, ${num_test} test dialogues (seed ${seed})"
python -m speechllm.corpus.sgd --sgd_root "${sgd_root}" "${download[@]}" --outdir downloads/sgd_seed${seed} \
  --num_train "${num_train}" --num_valid "${num_valid}" --num_test "${num_test}" --seed "${seed}" \
  --prefix_collisions "${prefix_collisions}"
log "speaking them with espeak-ng into data/"
python -m speechllm.corpus.synth --conversations "downloads/sgd_seed${seed}/conversations.jsonl" \
  --inventory "downloads/sgd_seed${seed}/slot_inventory.{split}.json" --wavdir "downloads/sgd_seed${seed}/wav" \
  --datadir data --nj "${nj}" --seed "${seed}"
