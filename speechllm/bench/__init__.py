"""Measurements for ``speechllm-bench``: each module measures one thing (the machine, training throughput,
training memory) and returns a JSON-able dict, which the command line (:mod:`speechllm.bin.bench`) writes
under a key of ``bench.json``."""
