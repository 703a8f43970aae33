"""Learning curves of several experiments: dev partial/exact F1 against minutes of slot-filling training
(the budget of ``max_minutes``: the alignment phase is not in it) or against optimizer steps.

Reads each experiment's ``curve.jsonl`` (written when the training config sets ``eval_every``).

    python -m speechllm.bin.plot_curves exp/a exp/b --labels "audio only" "text first" --x steps --output curves.png
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
    parser.add_argument("--x", choices=("minutes", "steps"), default="minutes", help="the horizontal axis")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [e.name for e in args.exps]
    if len(labels) != len(args.exps):
        parser.error("give one label per experiment")
    curves = [(label, [json.loads(line) for line in (exp / "curve.jsonl").read_text().splitlines()])
              for exp, label in zip(args.exps, labels)]
    plot_curves(curves, args.output, args.x)
    for label, points in curves:
        print(f"{label}: " + ", ".join(f"step {p['step']} ({p['train_s'] / 60:.1f} min): partial "
                                       f"{p['dev_partial_f1']:.3f} exact {p['dev_exact_f1']:.3f}" for p in points))


if __name__ == "__main__":
    main()
