# CI-sized preset: a handful of calls, a random tiny Whisper-shaped encoder and a tiny Llama whose
# tokenizer is trained on the corpus. All six stages take a few minutes on a 2-core CPU.
local_data_opts="--num_calls 10 --num_dev 2 --num_test 2"
whisper=conf/whisper/tiny_random.yaml
llm=tiny_llama
train_config=conf/train_mini.yaml
context_source=reference   # the random encoder's ASR output is noise
