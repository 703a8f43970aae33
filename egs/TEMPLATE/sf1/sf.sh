#!/usr/bin/env bash
# Shared stage script of every slot-filling recipe (like ESPnet's asr.sh). A recipe's run.sh sets
# its corpus options and calls this script; every variable below is also a --flag.
#
#   0 corpus preparation      local/data.sh -> data/<set>/
#   1 Whisper features + ASR  dump/<set>/feats.scp, text_asr, whisper (the encoder's record); with
#                             --align_calls, the alignment corpus <align_dump>/<whisper>/seed<seed>/
#   2 data formatting         dump/<set>/{regular,reasoning,hybrid,cascade}.jsonl
#   3 LoRA/QLoRA training     exp/<llm>_<mode><tag>/
#   4 decoding                exp/<llm>_<mode><tag>/decode_<set>_<mode>/
#   5 scoring                 .../score/scores.json (the run's identity, per-group scores with
#                             data/<set>/utt2group, the novel-value turns' scores) and ${results_md}
set -euo pipefail

. utils/log.sh
. utils/files.sh

# General
stage=0
stop_stage=5
preset=""            # conf/preset/<name>.sh sets defaults (flags given explicitly still win)
nj=2                 # parallel jobs of stages 1 and 4
seed=1
# Stage 0
local_data_opts=""   # passed to local/data.sh
# Stage 1
whisper=base         # Whisper size name, checkpoint path, or conf/whisper/*.yaml (recorded in dump/<set>/whisper)
asr=true             # also decode Whisper ASR hypotheses (context and the cascade)
asr_pack=true        # several short turns per 30-s Whisper window for the ASR (false: one window each)
asr_chunk=32         # turns per batched ASR call (on a GPU: the batch of windows)
feats_dtype=float32  # float32 | float16 (half the disk; read back unchanged)
align_calls=1600     # calls of the alignment corpus (about 7.6 turns each), made when stage 3 aligns (align.steps)
align_seed=1         # its stream of calls (the same seed extends a smaller corpus)
align_dump=../../align_dump  # where alignment corpora are kept, per Whisper, shared by the recipes
# Stage 2
context_source=asr   # asr | reference
query_prob=0.5
label_order=gold_first  # queried labels in targets: gold_first (the paper's Figure 3) | prompt (its shuffled order)
own_domain_share=0.8    # share of distractor labels from the turn's own domain (with utt2domain and label domains)
# Stage 3
llm=smollm2_135m     # conf/llm/<llm>.yaml
llm_path=""          # overrides the config's name_or_path (a local copy of the weights)
mode=all             # regular | reasoning | hybrid | cascade | a list (regular,hybrid) | all (all four)
train_config=conf/train.yaml
train_args=""        # overrides of train_config's keys, e.g. "lr=1e-3 align.steps=600" (resolved: <exp>/train.yaml)
llm_args=""          # overrides of the LLM config's keys, e.g. "lora.r=16" (resolved: <exp>/llm.yaml)
force_config=false   # true: resume an experiment even though its resolved configs changed
tag=""               # suffix of the experiment dir name
align_dir=""         # the alignment the modes share (default exp/<llm>_align<tag>); another run's reuses it
ngpu=0               # GPUs per training node, and 1 GPU per job of stages 1 and 4 when > 0 (0: CPU)
num_nodes=1          # nodes of the training job (more than 1 needs cmd_backend=slurm)
cpu_procs=1          # with --ngpu 0: training processes per node (gloo DDP)
cpus_per_gpu=4       # with --ngpu > 0: CPUs per training process (its threads and DataLoader workers)
# Stage 4
decode_batch_size=8
num_beams=1
max_new_tokens=0     # cap on generated tokens; 0: from the longest training target
# Stage 5
allow_missing=false  # true: score an incomplete decode, its missing utterances as false negatives
# Sets
train_set=train
valid_set=dev
test_sets="test"
results_md=exp/RESULTS.md  # stage 5's tables, <name>_f1.png beside (the recipe's own RESULTS.md only if given)

help_message="Usage: $0 [--option value ...]. Options and their defaults:
$(sed -n '/^# General$/,/^results_md=/p' "${BASH_SOURCE[0]}" | grep -E '^([a-z_]+=|# )')"

args=("$@")  # recorded as the command of each stage
. utils/apply_preset.sh "$@"
. utils/parse_options.sh
. ./path.sh
. ./cmd.sh

llm_config=conf/llm/${llm}.yaml
if [ ! -f "${llm_config}" ]; then
  log "Error: unknown --llm '${llm}'. Available: $(ls conf/llm | sed -n 's/\.yaml$//p' | tr '\n' ' ')"
  exit 1
fi
modes=$(python -m speechllm.bin.modes "${mode}")  # checks --mode and expands all
if [[ " ${modes} " == *" cascade "* ]] && [ "${asr}" != true ]; then
  log "Error: the cascade (--mode cascade or all) needs Whisper's transcripts: --asr true"
  exit 1
fi
[ -f "${train_config}" ] || { log "Error: --train_config ${train_config} not found"; exit 1; }
expdir_of() { echo "exp/${llm}_$1${tag:+_${tag}}"; }
job_gpu=$((ngpu > 0 ? 1 : 0))  # GPUs per job of stages 1 and 4
all_sets="${train_set} ${valid_set} ${test_sets}"
mkdir -p exp
stage_times=exp/stage_times.tsv
# what RESULTS.md says produced each stage: the command and the code's commit (+changes: uncommitted edits)
sf_command=${SF_COMMAND:-}
[ -n "${sf_command}" ] || printf -v sf_command '%q ' "$0" "${args[@]}"
sf_commit=$(git rev-parse --short HEAD 2>/dev/null || echo -)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then sf_commit="${sf_commit}+changes"; fi
timed() {  # timed <stage> <command...>: run a stage and record its wall time, what it ran for, and how
  local s=$1; shift
  local start=${SECONDS}
  "$@"
  local what="data"
  [ "${s}" -ge 3 ] && what="${llm} ${mode}${tag:+ ${tag}}"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$((SECONDS - start))" "$(date '+%Y-%m-%dT%H:%M:%S')" "${what}" \
    "${sf_command}" "${sf_commit}" >> "${stage_times}"
}

stage0() {
  log "Stage 0: corpus preparation -> data/"
  local/data.sh ${local_data_opts}
}

dump_set() {  # dump_set <data dir> <dump dir> <asr>: Whisper features (and ASR) of a data dir in ${nj} jobs
  local data=$1 out=$2 with_asr=$3 split=$2/split${nj}  # a job run again skips the turns it has (see dump_feats.py)
  # the set's merged files go first, and stage 2's (their rows point into the arks), and feats.scp
  # comes back last: a stage 1 that does not complete leaves no feats.scp, which stage 2 refuses
  rm -f "${out}/feats.scp" "${out}/text_asr" "${out}/utt2num_frames" "${out}/skipped" "${out}/whisper" \
    "${out}"/*.jsonl "${out}/dropped"
  ${feats_cmd} --gpu "${job_gpu}" JOB=1:"${nj}" "${split}"/log/dump.JOB.log \
    python -m speechllm.bin.dump_feats --data_dir "${data}" --outdir "${split}" \
    --whisper "${whisper}" --asr "${with_asr}" --asr_pack "${asr_pack}" --asr_chunk "${asr_chunk}" \
    --feats_dtype "${feats_dtype}" --job JOB --nj "${nj}"
  local lists="utt2num_frames skipped"
  if [ "${with_asr}" = true ]; then lists="text_asr ${lists}"; fi  # no transcripts without ASR, not empty ones
  for f in ${lists}; do
    merge "${out}/${f}" sort $(job_files "${split}/${f}." "")
  done
  # the jobs' records of --whisper are one line, the same in each (training reads it)
  merge "${out}/whisper" sort -u $(job_files "${split}/whisper." "")
  merge "${out}/feats.scp" sort $(job_files "${split}/feats." .scp)
  log "${out}: $(wc -l < "${out}/feats.scp") utterances, $(wc -l < "${out}/skipped") skipped (see ${out}/skipped)"
}

uses_align_corpus() {  # whether stage 3 aligns (align.steps of the resolved training config) on the corpus
  [ "${align_calls}" -gt 0 ] || return 1
  local steps
  steps=$(python -m speechllm.bin.train_config_value "${train_config}" align.steps --train_args "${train_args}") \
    || { log "Error: could not read align.steps of ${train_config} (--train_args '${train_args}')"; exit 1; }
  [ "${steps}" -gt 0 ]
}

align_corpus_dir() {  # one corpus per Whisper and seed; a larger --align_calls extends it
  echo "${align_dump}/$(basename "${whisper%.yaml}")/seed${align_seed}"
}

stage1() {
  for dset in ${all_sets}; do
    log "Stage 1: Whisper (${whisper}) features$([ "${asr}" = true ] && echo " and ASR") of data/${dset}" \
      "in ${nj} jobs -> dump/${dset}"
    dump_set "data/${dset}" "dump/${dset}" "${asr}"
  done
  uses_align_corpus || return 0
  local adir
  adir=$(align_corpus_dir)
  mkdir -p "${adir}"
  log "Stage 1: alignment corpus: ${align_calls} calls (seed ${align_seed}) spoken by espeak-ng, Whisper" \
    "(${whisper}) features -> ${adir}"
  (  # one writer at a time: recipes share the corpus
    flock 9
    python -m speechllm.corpus.alignment --outdir "${adir}/text" --num_calls "${align_calls}" --seed "${align_seed}"
    python -m speechllm.corpus.synth --conversations "${adir}/text/conversations.jsonl" \
      --inventory "${adir}/text/slot_inventory.json" --wavdir "${adir}/wav" --datadir "${adir}/data" \
      --nj "${nj}" --seed "${align_seed}" --voices wide
    dump_set "${adir}/data/align" "${adir}/dump" false
  ) 9> "${adir}/.lock"
}

stage2() {
  for dset in ${all_sets}; do
    log "Stage 2: formatting dump/${dset} (context from ${context_source})"
    python -m speechllm.bin.format_data --data_dir "data/${dset}" --dump_dir "dump/${dset}" --seed "${seed}" \
      --query_prob "${query_prob}" --context_source "${context_source}" --label_order "${label_order}" \
      --own_domain_share "${own_domain_share}"
  done
}

stage3() {
  # processes per node: one per GPU, or --cpu_procs on CPU (each needs a CPU of the job)
  local nproc_per_node=${ngpu} train_device=cuda train_threads="--num_threads $((ngpu * cpus_per_gpu))"
  if [ "${ngpu}" -eq 0 ]; then
    train_threads=""
    nproc_per_node=${cpu_procs} train_device=cpu
    [ "${cpu_procs}" -gt 1 ] && train_threads="--num_threads ${cpu_procs}"
  fi
  local opts=()  # the config stays the single description of the model; --llm_path changes its location
  if [ "${force_config}" = true ]; then opts+=(--force_config); fi
  if [ -n "${llm_path}" ]; then opts+=(--llm_path "${llm_path}"); fi
  # an alignment phase (the config's align.steps) runs once, into a dir every mode reuses
  opts+=(--align_dir "${align_dir:-$(expdir_of align)}")
  if uses_align_corpus; then opts+=(--align_corpus "$(align_corpus_dir)"); fi
  # a tiny test LLM's tokenizer learns every mode's texts: one tokenizer, so one alignment, for all modes
  local tiny_texts=() every
  for every in $(python -m speechllm.bin.modes); do tiny_texts+=("dump/${train_set}/${every}.jsonl"); done
  log "Stage 3: ${num_nodes} node(s) x ${nproc_per_node} process(es) on ${train_device}, batch per process" \
    "x grad_accum x $((num_nodes * nproc_per_node)) = effective batch (see ${train_config})"
  for m in ${modes}; do
    local expdir
    expdir=$(expdir_of "${m}")
    log "Stage 3: training ${llm} (${m}) -> ${expdir}"
    mkdir -p "${expdir}"
    # a training that holds the dir (bin/train.py's lock) keeps its log: refuse before moving it aside
    # (75: flock's exit status for a held lock, not for a file system without locks)
    local held=0
    if command -v flock > /dev/null && [ -f "${expdir}/.lock" ]; then
      flock -n -E 75 "${expdir}/.lock" true || held=$?
    fi
    if [ "${held}" -eq 75 ]; then
      log "Error: ${expdir} is in use by $(cat "${expdir}/.lock"): wait for it, stop it, or use another --tag"
      exit 1
    fi
    keep_log "${expdir}/train.log"
    # bin/train.py writes the resolved configs into the exp dir (train.yaml, llm.yaml) and takes the
    # Whisper of the features from stage 1's dump/<set>/whisper
    ${train_cmd} --gpu "${ngpu}" --num_nodes "${num_nodes}" ${train_threads} "${expdir}/train.log" \
      utils/torchrun.sh --nproc_per_node "${nproc_per_node}" --nnodes "${num_nodes}" \
      -m speechllm.bin.train --train_jsonl "dump/${train_set}/${m}.jsonl" \
      --valid_jsonl "dump/${valid_set}/${m}.jsonl" --train_config "${train_config}" --llm_config "${llm_config}" \
      --train_args "${train_args}" --llm_args "${llm_args}" "${opts[@]}" --outdir "${expdir}" --mode "${m}" \
      --align_eval $(for dset in ${test_sets}; do echo "dump/${dset}/${m}.jsonl"; done) --device "${train_device}" \
      --tiny_texts "${tiny_texts[@]}"
    log "$(grep 'training done' "${expdir}/train.log" | tail -1 | sed 's/.*INFO: //')"
  done
}

stage4() {
  for m in ${modes}; do
    local expdir names
    expdir=$(expdir_of "${m}")
    [ -f "${expdir}/model/speechllm.yaml" ] || { log "Error: ${expdir}/model missing: run stage 3 first"; exit 1; }
    names=$(python -m speechllm.bin.modes --decode "${m}")  # one decode per row mode (hybrid: no_think, think)
    for dset in ${test_sets}; do
      for name in ${names}; do
        local ddir=${expdir}/decode_${dset}_${name}
        log "Stage 4: decoding dump/${dset}/${m}.jsonl (${name}) in ${nj} jobs -> ${ddir}"
        # a decode that does not complete leaves no hyp.jsonl; a job run again resumes at its last whole batch
        rm -rf "${ddir}/hyp.jsonl" "${ddir}/score"
        ${decode_cmd} --gpu "${job_gpu}" JOB=1:"${nj}" "${ddir}/split${nj}/log/decode.JOB.log" \
          python -m speechllm.bin.decode --model_dir "${expdir}/model" --jsonl "dump/${dset}/${m}.jsonl" \
          --mode "${name}" --output "${ddir}/split${nj}/hyp.JOB.jsonl" --job JOB --nj "${nj}" \
          --batch_size "${decode_batch_size}" --num_beams "${num_beams}" --max_new_tokens "${max_new_tokens}"
        merge "${ddir}/hyp.jsonl" cat $(job_files "${ddir}/split${nj}/hyp." .jsonl)
      done
    done
  done
}

stage5() {
  local ddirs=()
  for m in ${modes}; do
    local expdir names
    expdir=$(expdir_of "${m}")
    names=$(python -m speechllm.bin.modes --decode "${m}")
    for dset in ${test_sets}; do
      for name in ${names}; do
        local ddir=${expdir}/decode_${dset}_${name}
        # the novel-value turns: novel to the training text and to the alignment corpus the run read
        local opts=(--seen_text "data/${train_set}/text")
        [ -f "data/${dset}/utt2group" ] && opts+=(--utt2group "data/${dset}/utt2group")
        [ "${allow_missing}" = true ] && opts+=(--allow_missing)
        log "Stage 5: scoring ${ddir}"
        python -m speechllm.bin.score --ref_jsonl "dump/${dset}/${m}.jsonl" --mode "${name}" "${opts[@]}" \
          --hyp_jsonl "${ddir}/hyp.jsonl" --outdir "${ddir}/score" --title "${ddir}" \
          --llm "${llm}" --tag "${tag}" --set "${dset}" --exp_dir "${expdir}"
        ddirs+=("${ddir}")
      done
    done
  done
  log "Stage 5: writing ${results_md}"
  python -m speechllm.bin.results --decode_dirs "${ddirs[@]}" --stage_times "${stage_times}" \
    --command "${sf_command}" --output "${results_md}" --plot "${results_md%.md}_f1.png"
}

for s in 0 1 2 3 4 5; do
  if [ "${stage}" -le "${s}" ] && [ "${stop_stage}" -ge "${s}" ]; then
    timed "${s}" "stage${s}"
  fi
done
log "Successfully finished. [elapsed=${SECONDS}s]"
