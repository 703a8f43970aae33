# Where corpora live. SGD: the upstream release (train/, dev/, schema.json in each); stage 0
# downloads it here when this default is used and the machine is online.
SGD_DOWNLOAD=downloads/dstc8-schema-guided-dialogue
SGD=${SGD:-${SGD_DOWNLOAD}}
