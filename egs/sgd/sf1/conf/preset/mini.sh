# CI-sized preset: a few dialogues (the test set with seen and unseen services), a random tiny
# Whisper-shaped encoder and a tiny Llama whose tokenizer is trained on the corpus.
local_data_opts="--num_train 3 --num_valid 1 --num_test 2"
whisper=conf/whisper/tiny_random.yaml
llm=tiny_llama
train_config=conf/train_mini.yaml
context_source=reference   # the random encoder's ASR output is noise
max_new_tokens_regular=64
max_new_tokens_reasoning=160
results_md=exp/RESULTS.md
