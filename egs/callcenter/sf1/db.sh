# Where corpora live. The call-centre corpus is generated here by stage 0.
CALLCENTER=${CALLCENTER:-downloads/callcenter}
