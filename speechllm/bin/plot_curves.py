"""Learning curves of several experiments: dev partial/exact F1 against minutes of training.

Reads each experiment's ``curve.jsonl`` (written when the training config sets ``eval_every``);
the time axis includes the alignment phase, so runs with the same budget compare directly.

    python -m speechllm.bin.plot_curves exp/a exp/b --labels "no alignment" "CTC alignment" --output curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speechllm.io_utils import atomic_write


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exps", type=Path, nargs="+")
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [e.name for e in args.exps]
    if len(labels) != len(args.exps):
        parser.error("give one label per experiment")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    table = []
    for exp, label in zip(args.exps, labels):
        points = [json.loads(line) for line in (exp / "curve.jsonl").read_text().splitlines()]
        minutes = [p["train_s"] / 60 for p in points]
        for ax, key in zip(axes, ("dev_partial_f1", "dev_exact_f1")):
            ax.plot(minutes, [p[key] for p in points], "o-", label=label)
        table.append((label, points))
    for ax, title in zip(axes, ("partial F1 (dev)", "exact F1 (dev)")):
        ax.set_xlabel("minutes of training (alignment included)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_write(args.output, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    for label, points in table:
        print(f"{label}: " + ", ".join(f"{p['train_s'] / 60:.1f} min: partial {p['dev_partial_f1']:.3f} "
                                       f"exact {p['dev_exact_f1']:.3f}" for p in points))


if __name__ == "__main__":
    main()
