# A few hours of CPU: three times the default corpus and 40 minutes of training per mode.
local_data_opts="--num_calls 150 --num_dev 6 --num_test 15"
train_config=conf/train_long.yaml
