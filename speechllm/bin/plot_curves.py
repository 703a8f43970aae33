"""Learning curves of several experiments: dev partial/exact F1 against minutes of training.

Reads each experiment's ``curve.jsonl`` (written when the training config sets ``eval_every``);
the time axis includes the alignment phase, so runs with the same budget compare directly.

    python -m speechllm.bin.plot_curves exp/a exp/b --labels "no alignment" "CTC alignment" --output curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speechllm.plots import plot_curves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exps", type=Path, nargs="+")
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [e.name for e in args.exps]
    if len(labels) != len(args.exps):
        parser.error("give one label per experiment")
    curves = [(label, [json.loads(line) for line in (exp / "curve.jsonl").read_text().splitlines()])
              for exp, label in zip(args.exps, labels)]
    plot_curves(curves, args.output)
    for label, points in curves:
        print(f"{label}: " + ", ".join(f"{p['train_s'] / 60:.1f} min: partial {p['dev_partial_f1']:.3f} "
                                       f"exact {p['dev_exact_f1']:.3f}" for p in points))


if __name__ == "__main__":
    main()
