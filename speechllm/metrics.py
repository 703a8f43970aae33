"""Slot-filling scores: exact, partial (the paper's headline), SLURP's SLU-F1 and span F1.

Scores are micro P/R/F1 over (label, value) pairs with a filled value (:mod:`speechllm.slots`: a
label may hold several values, absent values count nowhere), matched one-to-one per label by a
maximum matching, so the order of a turn's values never changes a score.

Exact and partial compare normalised values (:func:`normalize_value`):

1. Unicode NFKC, lower case; number words become digits (``text2num``: "thirty" -> 30,
   "five thousand" -> 5000, "twenty-one" -> 21, "third" -> 3rd).
2. Tokens are numbers and words; other punctuation and symbols are dropped, except inside numbers
   and words ("o'clock" -> oclock, "a.m." -> am).
3. Numbers are kept whole: "1,300" -> 1300, "2.50" -> 2.5, "30.00" -> 30, "1.300.000" -> 1300000,
   a decimal comma "497,07" -> 497.07, ".5" -> 0.5; scale words fold in ("1.4 million" ->
   1400000, "5k" -> 5000); hyphenated digit groups of 5 or more digits are one number ("867-9432"
   -> 8679432), shorter ones a range kept as written ("3-5"); clock times "10:30" -> 10 30 and
   "10:00" -> 10; attached ordinal suffixes go ("3rd" -> 3); a run of single digits is one number
   ("9 3 8 3 0" -> 93830, spelled-out digit strings, zeros included).
4. Currency and percent signs are part of the value, read as words after their number: "$30" ->
   30 dollars, "€30" -> 30 euros, "2.5%" -> 2.5 percent ("dollar", "usd" -> dollars, and so on).
   So "$30" equals "thirty dollars" but not "€30".

**exact**: the normalised token sequences are equal. **partial** (surface variants of the right
value, never a different value): exact, or one normalised value is a contiguous token sequence of
the other that holds a content word (not only "the", "of"...), and every number of either value is
in the other. "monthly" and "monthly payment" match, "30" and "30 dollars" match; "$1,300" and
"$300", "10 am" and "10 pm", "John Smith" and "John Doe", "30 dollars" and "50 dollars" do not.

SLU-F1 follows SLURP's scorer (Bastianelli et al., 2020) exactly: predicted pairs are visited in
order; a prediction whose label is among the remaining references takes the reference of that
label with the smallest distance d (first on ties) and adds TP 1, FP d, FN d; otherwise FP 1;
leftover references add FN 1. The word run uses WER (unclipped), the char run the normalised
Levenshtein distance; SLU-F1 sums both runs' counts. Span F1 is SLURP's exact multiset match. As
in SLURP, reference values are lower-cased and predicted values are taken as they are. One
difference: SLURP's script skips an utterance without a prediction, and here its references count
as false negatives in every metric, so the two agree when every utterance was decoded.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Callable

import jiwer
import numpy as np
from rapidfuzz.distance import Levenshtein
from scipy.optimize import linear_sum_assignment
from text_to_num import alpha2digit

from speechllm.slots import Slots, filled_pairs

STOP_WORDS = frozenset("a an the of and or to in on at for by my your our is it its".split())
UNIT_WORDS = {"$": "dollars", "dollar": "dollars", "usd": "dollars", "€": "euros", "euro": "euros",
              "eur": "euros", "£": "pounds", "pound": "pounds", "gbp": "pounds", "%": "percent"}
# text2num writes "million" as 1000000, so "5 million" arrives as "5 1000000"
SCALES = {"k": 1000, "1000": 1000, "1000000": 10**6, "1000000000": 10**9}
_LEADING_POINT_RE = re.compile(r"(?<!\w)\.(?=\d)")
_CURRENCY_FIRST_RE = re.compile(rf"([$€£])\s*(\d[\d.,]*(?:\s*(?:{'|'.join(SCALES)})\b)?)")
_TOKEN_RE = re.compile(r"\d+(?:[.,:/-]\d+)*(?:(?:st|nd|rd|th)(?![^\W\d_]))?"  # numbers, "3rd" included
                       r"|[^\W\d_]+(?:['’.][^\W\d_]+)*|[$€£%]")


def _number(token: str) -> list[str]:
    """A number token in its canonical form (see the module docstring, step 3)."""
    token = re.sub(r"(?:st|nd|rd|th)$", "", token)
    if re.fullmatch(r"\d{1,2}(?::\d\d)+", token):  # a clock time
        hour, *rest = token.split(":")
        return [str(int(hour))] + [part for part in rest if part != "00"]
    if re.fullmatch(r"\d+(?:-\d+)+", token) and len(token) - token.count("-") >= 5:
        return [token.replace("-", "")]  # digit groups: "867-9432"; a range such as "3-5" stays
    if not re.fullmatch(r"\d+(?:[.,]\d+)+", token):  # an integer, a range, a date such as 3/15
        return [token]
    separators = [ch for ch in token if ch in ".,"]
    last, point = separators[-1], token.rfind(separators[-1])
    decimal = separators.count(last) == 1 and (last == "." or len(token) - point - 1 != 3)
    if not decimal:
        return [re.sub(r"\D", "", token)]
    integer, fraction = re.sub(r"\D", "", token[:point]), token[point + 1 :].rstrip("0")
    return [integer + ("." + fraction if fraction else "")]


def _scaled(tokens: list[str]) -> list[str]:
    """Scale words fold into their number: "1.4 million" -> 1400000, "5k" -> 5000."""
    out: list[str] = []
    for token in tokens:
        if token in SCALES and out and re.fullmatch(r"\d+(?:\.\d+)?", out[-1]):
            out[-1] = format((Decimal(out[-1]) * SCALES[token]).normalize(), "f")
        else:
            out.append(token)
    return out


def _digit_runs_joined(tokens: list[str]) -> list[str]:
    """Spelled-out digits are one number: "9 3 8 3 0" -> 93830, and text2num's "5 00" -> 500."""
    out: list[str] = []
    for token, previous in zip(tokens, [""] + tokens):
        if _digit_piece(token) and _digit_piece(previous):
            out[-1] += token
        else:
            out.append(token)
    return out


def _digit_piece(token: str) -> bool:
    return token.isdigit() and (len(token) == 1 or token.startswith("0"))


@lru_cache(maxsize=1 << 16)
def value_tokens(value: str) -> tuple[str, ...]:
    """The normalised tokens of a value, which exact and partial matching compare."""
    text = alpha2digit(unicodedata.normalize("NFKC", str(value)).lower(), "en", threshold=0)
    text = _LEADING_POINT_RE.sub("0.", text)  # ".5" -> "0.5"
    text = _CURRENCY_FIRST_RE.sub(r"\2 \1", text)  # "$30" -> "30 $", "$5 million" -> "5 million $"
    tokens: list[str] = []
    for raw in _TOKEN_RE.findall(text):
        if raw[0].isdigit():
            tokens.extend(_number(raw))
        else:
            tokens.append(UNIT_WORDS.get(raw, re.sub(r"['’.]", "", raw)))
    return tuple(_digit_runs_joined(_scaled(tokens)))


def normalize_value(value: str) -> str:
    """A value's normalised tokens joined by spaces: ``"$1,300.00"`` -> ``"1300 dollars"``."""
    return " ".join(value_tokens(value))


def _numbers(tokens: tuple[str, ...]) -> set[str]:
    return {t for t in tokens if t[0].isdigit()}


def _contains(words: tuple[str, ...], sub: tuple[str, ...]) -> bool:
    n = len(sub)
    return n > 0 and any(words[i : i + n] == sub for i in range(len(words) - n + 1))


def exact_match(ref: str, hyp: str) -> bool:
    a, b = value_tokens(ref), value_tokens(hyp)
    return a == b if a or b else ref.strip() == hyp.strip()


def partial_match(ref: str, hyp: str) -> bool:
    """Surface variants only: exact, or containment with a content word and the same numbers."""
    short, long = sorted((value_tokens(ref), value_tokens(hyp)), key=len)
    return exact_match(ref, hyp) or (_contains(long, short) and any(t not in STOP_WORDS for t in short)
                                     and _numbers(long) <= _numbers(short))


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


Pairs = list[tuple[str, str]]


def matched_pairs(ref: Pairs, hyp: Pairs, same: Callable[[str, str], bool]) -> list[tuple[int, int]]:
    """A maximum one-to-one matching of hypothesis to reference pairs of the same label, as
    ``(ref index, hyp index)``: with several values per label, no greedy order can lose a match."""
    out = []
    for label in {label for label, _ in hyp}:
        r = [i for i, (l, _) in enumerate(ref) if l == label]
        h = [j for j, (l, _) in enumerate(hyp) if l == label]
        if not r:
            continue
        ok = np.array([[same(ref[i][1], hyp[j][1]) for j in h] for i in r])
        rows, cols = linear_sum_assignment(ok, maximize=True)
        out.extend((r[a], h[b]) for a, b in zip(rows, cols) if ok[a, b])
    return sorted(out)


def match_counts(ref: Pairs, hyp: Pairs, same: Callable[[str, str], bool]) -> dict[str, Counts]:
    """TP per matched pair (:func:`matched_pairs`), FP per unmatched prediction, FN per unmatched reference."""
    counts: dict[str, Counts] = defaultdict(Counts)
    matched = matched_pairs(ref, hyp, same)
    for i, _ in matched:
        counts[ref[i][0]].tp += 1
    for j in set(range(len(hyp))) - {j for _, j in matched}:
        counts[hyp[j][0]].fp += 1
    for i in set(range(len(ref))) - {i for i, _ in matched}:
        counts[ref[i][0]].fn += 1
    return counts


def word_distance(ref: str, hyp: str) -> float:
    return float(jiwer.wer(ref, hyp))


def char_distance(ref: str, hyp: str) -> float:
    return Levenshtein.normalized_distance(ref, hyp)


def slurp_distance_counts(ref: Pairs, hyp: Pairs, distance: Callable[[str, str], float]) -> dict[str, Counts]:
    """SLURP's span-distance counting (see the module docstring); ``ref`` values already lower-cased."""
    counts: dict[str, Counts] = defaultdict(Counts)
    remaining = list(ref)
    for label, value in hyp:
        candidates = [(distance(v, value), i) for i, (l, v) in enumerate(remaining) if l == label]
        if not candidates:
            counts[label].fp += 1
            continue
        best_d, best_i = min(candidates)
        counts[label].tp += 1
        counts[label].fp += best_d
        counts[label].fn += best_d
        remaining.pop(best_i)
    for label, _ in remaining:
        counts[label].fn += 1
    return counts


METRICS: dict[str, Callable[[Pairs, Pairs], dict[str, Counts]]] = {
    "exact": lambda r, h: match_counts(r, h, exact_match),
    "partial": lambda r, h: match_counts(r, h, partial_match),
}
SLURP_METRICS: dict[str, Callable[[Pairs, Pairs], dict[str, Counts]]] = {
    "span_f1": lambda r, h: match_counts(r, h, str.__eq__),
    "slu_word": lambda r, h: slurp_distance_counts(r, h, word_distance),
    "slu_char": lambda r, h: slurp_distance_counts(r, h, char_distance),
}


class SlotScorer:
    """Accumulates micro counts over utterances, overall and per slot label."""

    def __init__(self) -> None:
        self.per_label: dict[str, dict[str, Counts]] = {m: defaultdict(Counts) for m in {**METRICS, **SLURP_METRICS}}
        self.n_utts = 0
        self.n_missing = 0
        self.n_unparseable = 0

    def add(self, ref: Slots, hyp: Slots | None, parseable: bool = True) -> None:
        """Score one utterance. ``hyp=None`` is a missing hypothesis: all references become FN."""
        self.n_utts += 1
        if hyp is None:
            self.n_missing += 1
            hyp = {}
        elif not parseable:
            self.n_unparseable += 1
        ref_pairs, hyp_pairs = filled_pairs(ref), filled_pairs(hyp)
        slurp_ref = [(label, value.lower()) for label, value in ref_pairs]  # SLURP lower-cases the gold only
        for metrics, refs in ((METRICS, ref_pairs), (SLURP_METRICS, slurp_ref)):
            for name, fn in metrics.items():
                for label, counts in fn(refs, hyp_pairs).items():
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


def score_corpus(refs: dict[str, Slots], hyps: dict[str, tuple[Slots, bool]]) -> dict:
    """Score every reference utterance; utterances absent from ``hyps`` count as missing."""
    scorer = SlotScorer()
    for utt_id in sorted(refs):
        if utt_id in hyps:
            slots, parseable = hyps[utt_id]
            scorer.add(refs[utt_id], slots, parseable)
        else:
            scorer.add(refs[utt_id], None)
    return scorer.result()


def holds(text: str, value: str) -> bool:
    """Whether ``text`` holds ``value`` as a contiguous token sequence, both normalised."""
    return _contains(value_tokens(text), value_tokens(value))


def in_text(value: str, text: str) -> bool:
    """Whether ``value`` occurs in ``text``, both normalised: for a value with numbers, whether its
    numbers are all numbers of the text ("867-9432" holds "8 6 7 9 4 3 2", "$130" holds "130
    dollars"); otherwise as a contiguous token sequence ("the plan is Family Share" holds "family
    share"). Single digits next to each other in the text merge into one number, as in values, so
    a lone digit of the text that stands beside another one is not found."""
    numbers = _numbers(value_tokens(value))
    return numbers <= _numbers(value_tokens(text)) if numbers else holds(text, value)


def matches_in_prompt(refs: dict[str, Slots], hyps: dict[str, tuple[Slots, bool]],
                      prompts: dict[str, str]) -> dict[str, dict[str, int]]:
    """How many exact and partial matches have their predicted value in the prompt's text as well.

    An end-to-end model's right value may come from the audio or be copied from the text context
    (the previous turns); only the first is hearing. ``in_text`` errs towards "copied" (a number is
    found wherever the text has it, whatever surrounds it), so a value not in the prompt was mostly
    not copied: heard, or a training prior that happens to match. For the
    cascade every heard value is in the prompt, since the transcript is.
    """
    out = {m: {"matches": 0, "in_prompt": 0} for m in ("exact", "partial")}
    for utt_id, ref in refs.items():
        ref_pairs = filled_pairs(ref)
        hyp_pairs = filled_pairs(hyps.get(utt_id, ({}, False))[0] or {})
        prompt = prompts.get(utt_id, "")
        for metric, same in (("exact", exact_match), ("partial", partial_match)):
            for _, j in matched_pairs(ref_pairs, hyp_pairs, same):
                out[metric]["matches"] += 1
                out[metric]["in_prompt"] += in_text(hyp_pairs[j][1], prompt)
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
