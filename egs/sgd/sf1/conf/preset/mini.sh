# CI-sized preset: the call-centre recipe's mini models (sourced, paths are
# relative to this recipe, so conf/train_mini.yaml is this recipe's), on a few SGD dialogues whose
# test set has seen and unseen services.
. ../../callcenter/sf1/conf/preset/mini.sh
local_data_opts="--num_train 3 --num_valid 1 --num_test 2"
