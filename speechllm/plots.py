"""Every figure of the toolkit: training loss (stage 3), learning curves, the alignment phase's curves,
and partial F1 per system and mode (stage 5).

matplotlib is imported inside each function with the Agg backend, so modules that import this one
start fast and plot without a display. A PNG is written aside and renamed, like every other output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from speechllm.formatting import DECODES
from speechllm.io_utils import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path) -> None:
    plt = _pyplot()
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def plot_losses(log_path: Path, png: Path) -> None:
    """Training (and validation) loss against optimizer steps."""
    plt = _pyplot()
    train, valid = [], []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train.append((r["step"], r["loss"]))
            elif "valid_loss" in r and not math.isnan(r["valid_loss"]):
                valid.append((r["step"], r["valid_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, png)


def plot_curves(curves: list[tuple[str, list[dict]]], png: Path, x: str = "minutes") -> None:
    """Dev partial and exact F1 of each labelled experiment (the points of its ``curve.jsonl``) against
    minutes of slot-filling training (``x="minutes"``: runs with the same budget compare directly) or
    optimizer steps (``x="steps"``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, points in curves:
        xs = [p["train_s"] / 60 if x == "minutes" else p["step"] for p in points]
        for ax, key in zip(axes, ("dev_partial_f1", "dev_exact_f1")):
            ax.plot(xs, [p[key] for p in points], "o-", label=label)
    for ax, title in zip(axes, ("partial F1 (dev)", "exact F1 (dev)")):
        ax.set_xlabel("minutes of slot-filling training" if x == "minutes" else "slot-filling steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, png)


def plot_alignment(history: list[dict], sets: list[str], png: Path) -> None:
    """The alignment phase's greedy CTC WER and slot-value recall (all values, and the novel turns'
    where a set has them) on each held-out set against CTC steps (``align_log.jsonl``)."""
    plt = _pyplot()
    fig, (wer_ax, recall_ax) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in history]
    for name in sets:
        line, = wer_ax.plot(steps, [r[f"{name}_wer"] for r in history], "o-", label=name)
        for kind, total, style, label in (("values_heard", "values", "o-", name),
                                          ("novel_heard", "novel_values", "s--", f"{name}, novel values")):
            if history and history[-1][f"{name}_{total}"]:
                recall_ax.plot(steps, [r[f"{name}_{kind}"] / r[f"{name}_{total}"] for r in history], style,
                               color=line.get_color(), label=label)
    for ax, title in ((wer_ax, "greedy CTC WER"), (recall_ax, "slot values heard (recall)")):
        ax.set_xlabel("CTC step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    recall_ax.set_ylim(0, 1)
    fig.tight_layout()
    _save(fig, png)


def plot_f1(table: dict[tuple[str, str], dict[str, dict]], png: Path) -> None:
    """Grouped bars: partial-match F1 of every system (and test set) in every mode it has.

    ``table`` is ``{(system, test set): {row mode: scores.json}}``, as :mod:`speechllm.bin.results` builds it.
    """
    plt = _pyplot()
    keys = sorted(table)
    width = 0.8 / len(DECODES)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys)), 4))
    for j, mode in enumerate(DECODES):
        xs = [i + (j - (len(DECODES) - 1) / 2) * width for i, k in enumerate(keys) if mode in table[k]]
        ys = [table[k][mode]["partial"]["f1"] for k in keys if mode in table[k]]
        if xs:
            ax.bar_label(ax.bar(xs, ys, width, label=mode), fmt="%.2f", fontsize=6)  # zeros stay visible
    ax.set_xticks(range(len(keys)), [f"{s}\n({d})" for s, d in keys], fontsize=8)
    ax.set_ylabel("partial-match F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, png)
