"""Corpus generators and converters into the shared conversation format.

Every corpus is first written as ``conversations.jsonl`` (one call per line: ``conv_id``, ``split``,
``domain`` and ``turns`` of ``{speaker, text, slots}``) plus ``slot_inventory.json``
(``{label: description}``); :mod:`speechllm.corpus.synth` then speaks it into Kaldi data dirs.
"""
