"""Stage 2: write ``regular.jsonl``, ``reasoning.jsonl``, ``hybrid.jsonl`` and ``cascade.jsonl`` into a dump dir.

``hybrid.jsonl`` holds two rows per utterance, ``<utt>#no_think`` and ``<utt>#think``. ``cascade.jsonl``
(the ASR -> LLM baseline) is written only when the dump dir has ``text_asr`` (stage 1 with ``--asr
true``): the regular prompt and target with Whisper's transcript in the audio's place, no features.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from speechllm.formatting import LABEL_ORDERS, build_examples, write_examples
from speechllm.logging_utils import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--dump_dir", type=Path, required=True, help="holds feats.scp and text_asr")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--query_prob", type=float, default=0.5, help="share of prompts with a slot query")
    parser.add_argument("--context_source", choices=("asr", "reference"), default="asr")
    parser.add_argument("--label_order", choices=LABEL_ORDERS, default="gold_first",
                        help="queried labels in the target and trace: gold first, as in the paper's Figure 3, "
                             "or in the prompt's shuffled order")
    parser.add_argument("--own_domain_share", type=float, default=0.8,
                        help="share of distractor labels drawn from the turn's own domain, where the data dir has "
                             "utt2domain and the inventory the labels' domains")
    args = parser.parse_args(argv)
    setup_logging()
    if not 0 <= args.own_domain_share <= 1:
        parser.error(f"--own_domain_share must be within [0, 1], got {args.own_domain_share}")
    examples = build_examples(args.data_dir, args.dump_dir, args.seed, args.query_prob, args.context_source,
                              args.label_order, args.own_domain_share)
    write_examples(examples, args.dump_dir)


if __name__ == "__main__":
    main()
