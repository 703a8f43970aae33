"""Slot-filling scores: exact, partial (the paper's headline), SLURP's SLU-F1 and span F1.

Only (label, value) pairs whose value is non-empty and not ``'None'`` count. Matching is one-to-one.

Normalisation (exact and partial): Unicode NFKC, lower case, every punctuation or symbol character
replaced by a space, whitespace collapsed. ``"€30."`` and ``" 30 "`` are equal.

Partial rule: same label, and the normalised values overlap, i.e. one is a contiguous word
sequence inside the other (``"monthly payment"`` vs ``"monthly"``), or they share at least one
content word (a word outside a short stop-word list: ``"30 euros"`` vs ``"30"``; but ``"the bank"``
vs ``"the card"`` does not count).

SLU-F1 follows SLURP's scorer (Bastianelli et al., 2020): predicted pairs are visited in order; a
prediction whose label is among the remaining references takes the reference of that label with
the smallest distance d (first on ties) and adds TP 1, FP d, FN d; otherwise FP 1; leftover
references add FN 1. The word run uses WER (unclipped), the char run the normalised Levenshtein
distance; SLU-F1 sums both runs' counts. Reference values are lower-cased, as in SLURP; since
SLURP systems emit lower-case text, :class:`SlotScorer` lower-cases our predictions before this
metric too (the counting function itself is SLURP's, unchanged).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import jiwer
from rapidfuzz.distance import Levenshtein

STOP_WORDS = frozenset("a an the of and or to in on at for by my your our is it its".split())


def normalize_value(value: str) -> str:
    text = unicodedata.normalize("NFKC", str(value)).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def is_filled(value: object) -> bool:
    return value is not None and str(value).strip() not in ("", "None", "none", "null")


def filled_pairs(slots: dict[str, str]) -> list[tuple[str, str]]:
    return [(label, str(value)) for label, value in slots.items() if is_filled(value)]


def exact_match(ref: str, hyp: str) -> bool:
    return normalize_value(ref) == normalize_value(hyp)


def _contains(words: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return n > 0 and any(words[i : i + n] == sub for i in range(len(words) - n + 1))


def partial_match(ref: str, hyp: str) -> bool:
    ref_words, hyp_words = normalize_value(ref).split(), normalize_value(hyp).split()
    if _contains(ref_words, hyp_words) or _contains(hyp_words, ref_words):
        return True
    return bool((set(ref_words) & set(hyp_words)) - STOP_WORDS)


@dataclass
class Counts:
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0

    def __iadd__(self, other: "Counts") -> "Counts":
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        return self

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp > 0 else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn > 0 else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                "tp": self.tp, "fp": self.fp, "fn": self.fn}


def match_counts(ref: list[tuple[str, str]], hyp: list[tuple[str, str]],
                 same: Callable[[str, str], bool]) -> dict[str, Counts]:
    """One-to-one matching per label: each prediction takes the first unused matching reference."""
    counts: dict[str, Counts] = defaultdict(Counts)
    remaining = list(ref)
    for label, value in hyp:
        hit = next((i for i, (l, v) in enumerate(remaining) if l == label and same(v, value)), None)
        if hit is None:
            counts[label].fp += 1
        else:
            counts[label].tp += 1
            remaining.pop(hit)
    for label, _ in remaining:
        counts[label].fn += 1
    return counts


def word_distance(ref: str, hyp: str) -> float:
    return float(jiwer.wer(ref, hyp)) if ref.strip() else float(bool(hyp.strip()))


def char_distance(ref: str, hyp: str) -> float:
    return Levenshtein.normalized_distance(ref, hyp)


def slurp_distance_counts(ref: list[tuple[str, str]], hyp: list[tuple[str, str]],
                          distance: Callable[[str, str], float]) -> dict[str, Counts]:
    """SLURP's span-distance counting (see the module docstring)."""
    counts: dict[str, Counts] = defaultdict(Counts)
    remaining = [(label, value.lower()) for label, value in ref]
    for label, value in hyp:
        candidates = [(distance(v, value), i) for i, (l, v) in enumerate(remaining) if l == label]
        if not candidates:
            counts[label].fp += 1
            continue
        best_d, best_i = min(candidates, key=lambda c: (c[0], c[1]))
        counts[label].tp += 1
        counts[label].fp += best_d
        counts[label].fn += best_d
        remaining.pop(best_i)
    for label, _ in remaining:
        counts[label].fn += 1
    return counts


METRICS: dict[str, Callable[[list, list], dict[str, Counts]]] = {
    "exact": lambda r, h: match_counts(r, h, exact_match),
    "partial": lambda r, h: match_counts(r, h, partial_match),
    "span_f1": lambda r, h: match_counts(r, h, lambda a, b: a == b),
    "slu_word": lambda r, h: slurp_distance_counts(r, h, word_distance),
    "slu_char": lambda r, h: slurp_distance_counts(r, h, char_distance),
}


class SlotScorer:
    """Accumulates micro counts over utterances, overall and per slot label."""

    def __init__(self) -> None:
        self.per_label: dict[str, dict[str, Counts]] = {m: defaultdict(Counts) for m in METRICS}
        self.n_utts = 0
        self.n_missing = 0
        self.n_unparseable = 0

    def add(self, ref: dict[str, str], hyp: dict[str, str] | None, parseable: bool = True) -> None:
        """Score one utterance. ``hyp=None`` is a missing hypothesis: all references become FN."""
        self.n_utts += 1
        if hyp is None:
            self.n_missing += 1
            hyp = {}
        elif not parseable:
            self.n_unparseable += 1
        ref_pairs, hyp_pairs = filled_pairs(ref), filled_pairs(hyp)
        for name, fn in METRICS.items():
            if name.startswith("slu_"):
                hyp_pairs_for_metric = [(label, value.lower()) for label, value in hyp_pairs]
            else:
                hyp_pairs_for_metric = hyp_pairs
            for label, counts in fn(ref_pairs, hyp_pairs_for_metric).items():
                self.per_label[name][label] += counts

    def total(self, name: str) -> Counts:
        total = Counts()
        for counts in self.per_label[name].values():
            total += counts
        return total

    def result(self) -> dict:
        slu = self.total("slu_word")
        slu += self.total("slu_char")
        labels = sorted(set().union(*(self.per_label[m].keys() for m in ("exact", "partial"))))
        return {
            "partial": self.total("partial").to_dict(),
            "exact": self.total("exact").to_dict(),
            "slu_f1": slu.to_dict(),
            "span_f1": self.total("span_f1").to_dict(),
            "n_utts": self.n_utts,
            "n_missing": self.n_missing,
            "n_unparseable": self.n_unparseable,
            "per_slot": {label: {m: self.per_label[m][label].to_dict() for m in ("partial", "exact")}
                         for label in labels},
        }


def score_corpus(refs: dict[str, dict[str, str]],
                 hyps: dict[str, tuple[dict[str, str], bool]]) -> dict:
    """Score every reference utterance; utterances absent from ``hyps`` count as missing."""
    scorer = SlotScorer()
    for utt_id in sorted(refs):
        if utt_id in hyps:
            slots, parseable = hyps[utt_id]
            scorer.add(refs[utt_id], slots, parseable)
        else:
            scorer.add(refs[utt_id], None)
    return scorer.result()


def _numbers(text: str) -> set[str]:
    """The digit strings of the numbers in ``text``, however written ("$1,300", "8 6 7 9" -> "1300", "8679")."""
    return {re.sub(r"\D", "", chunk) for chunk in re.findall(r"\d(?:[\d,.\- ]*\d)?", text)}


def in_text(value: str, text: str) -> bool:
    """Whether ``value`` occurs in ``text``: for a value with digits, whether its number is one of
    the text's, however written ("867-9432" holds "8 6 7 9 4 3 2", "$130" holds "130 dollars");
    otherwise as a substring, ignoring case, spacing and punctuation."""
    digits = re.sub(r"\D", "", value)
    if digits:
        return digits in _numbers(text)
    squashed = "".join(normalize_value(value).split())
    return bool(squashed) and squashed in "".join(normalize_value(text).split())


def matches_in_prompt(refs: dict[str, dict[str, str]], hyps: dict[str, tuple[dict[str, str], bool]],
                      prompts: dict[str, str]) -> dict[str, dict[str, int]]:
    """How many exact and partial matches have their predicted value in the prompt's text as well.

    An end-to-end model's right value may come from the audio or be copied from the text context
    (the previous turns); only the first is hearing. ``in_text`` errs towards "copied", so a value
    not in the prompt was not copied: heard, or a training prior that happens to match. For the
    cascade every heard value is in the prompt, since the transcript is.
    """
    out = {m: {"matches": 0, "in_prompt": 0} for m in ("exact", "partial")}
    for utt_id, ref in refs.items():
        slots = hyps.get(utt_id, ({}, False))[0] or {}
        prompt = prompts.get(utt_id, "")
        for label, value in filled_pairs(ref):
            hyp = slots.get(label)
            if not is_filled(hyp):
                continue
            copied = in_text(str(hyp), prompt)
            for metric, match in (("exact", exact_match), ("partial", partial_match)):
                if match(value, str(hyp)):
                    out[metric]["matches"] += 1
                    out[metric]["in_prompt"] += copied
    return out


def format_table(result: dict, title: str = "") -> str:
    """A readable plain-text table of P/R/F1 for each metric and per slot label."""
    lines = [title] if title else []
    lines.append(f"{'metric':<10} {'P':>7} {'R':>7} {'F1':>7}")
    for name in ("partial", "exact", "slu_f1", "span_f1"):
        r = result[name]
        lines.append(f"{name:<10} {r['precision']:7.4f} {r['recall']:7.4f} {r['f1']:7.4f}")
    lines.append(f"utterances {result['n_utts']}, missing {result['n_missing']}, "
                 f"unparseable {result['n_unparseable']}")
    if "matches_in_prompt" in result:
        m = result["matches_in_prompt"]
        lines.append(f"matches whose value is also in the prompt's text: exact {m['exact']['in_prompt']} of "
                     f"{m['exact']['matches']}, partial {m['partial']['in_prompt']} of {m['partial']['matches']}")
    for group, r in result.get("groups", {}).items():
        p = r["partial"]
        lines.append(f"group {group}: partial {p['precision']:.4f} {p['recall']:.4f} {p['f1']:.4f} "
                     f"({r['n_utts']} utterances)")
    lines.append("")
    lines.append(f"{'slot (partial)':<32} {'P':>7} {'R':>7} {'F1':>7} {'n_ref':>6}")
    for label, scores in result["per_slot"].items():
        r = scores["partial"]
        lines.append(f"{label:<32} {r['precision']:7.4f} {r['recall']:7.4f} {r['f1']:7.4f} "
                     f"{int(r['tp'] + r['fn']):6d}")
    return "\n".join(lines) + "\n"
