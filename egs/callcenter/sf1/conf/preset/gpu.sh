# The paper's settings on one GPU (§3.1): the full-size corpus and 10 epochs at effective batch 32
# (4 x 8 accumulation; with --ngpu 4 it is the paper's 128). Whisper base and SmolLM2 by default;
# pick another foundation model with --llm.
local_data_opts="--num_calls 300 --num_dev 20 --num_test 30"
train_config=conf/train_gpu.yaml
ngpu=1
nj=4
decode_batch_size=32
