# The paper's settings on GPUs (§3.1): the full-size corpus and 10 epochs at effective batch 128 (4 per
# GPU, the accumulation follows --ngpu). Whisper base and SmolLM2 by default; pick another foundation
# model with --llm. Stages 1 and 4 run one GPU per job; features are stored in float16.
local_data_opts="--num_calls 300 --num_dev 20 --num_test 30"
train_config=conf/train_gpu.yaml
ngpu=1
nj=4
feats_dtype=float16
decode_batch_size=32
