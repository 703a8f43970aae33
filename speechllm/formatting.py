"""Stage 2: instruction, reasoning, hybrid and cascade examples from a data dir and its dumped features.

Per utterance (all draws from a RNG seeded by ``seed`` and the utterance id, so the result does not
depend on order or parallelism, and the regular and reasoning examples share one prompt):

* context: the previous T turns of the call, T ~ U{0..3} capped at the turns available, taken from
  Whisper's hypotheses (default) or the reference text;
* query (probability ``query_prob``): the turn's gold labels plus S ~ U{1..5} distractor labels from
  the slot inventory, shuffled in the prompt; the target lists every queried label, ``'None'`` when
  absent, gold labels first as in the paper's Figure 3 (``label_order="prompt"``: the prompt's order);
* a template drawn from the 10 of its case (:mod:`speechllm.prompts`).

The reasoning trace explains each gold label by its description: the utterance's own (the
``descriptions`` of its ``slots.jsonl`` row) where given, else the inventory's.

Targets are JSON with double quotes; a label with several values in the turn holds a list
(``{"account_type": ["checking", "savings"]}``). The reasoning target follows the paper's Figure 3.
The cascade baseline has the regular example's prompt and target, with Whisper's transcript of
the turn in the audio's place and no features. The rows' fields, with an example of each target, are
described in docs/data.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from random import Random

from speechllm import prompts
from speechllm.io_utils import (InputError, atomic_write, read_descriptions, read_json, read_kaldi_map, read_slots,
                                write_kaldi_map)
from speechllm.parsing import format_slots
from speechllm.slots import Slots, filled_slots, values_of

log = logging.getLogger(__name__)

MODES = ("regular", "reasoning", "hybrid", "cascade")  # training modes: one stage-2 JSONL file and one model each
HYBRID = "hybrid"  # the mode whose prompts end in a /think or /no_think switch


def decode_mode(mode: str, think: bool | None = None) -> str:
    """A row's mode (and a decode dir's suffix): the training mode, with ``_think`` or ``_no_think`` for
    the switch of a hybrid row."""
    return mode if think is None else f"{mode}_{'think' if think else 'no_think'}"


# every row mode, in the order of the results tables: the training mode and the switch it stands for
DECODES = {decode_mode(m, t): (m, t) for m in MODES for t in ((False, True) if m == HYBRID else (None,))}


@dataclass(frozen=True)
class Draw:
    """The sampled prompt of one utterance, shared by all modes."""

    prompt: str
    queried: tuple[str, ...] | None  # None: no query


def conversation_order(data_dir: Path, utts: list[str]) -> dict[str, list[str]]:
    """Previous utterances of each utterance, in turn order (empty when the dir has no utt2conv)."""
    if not (data_dir / "utt2conv").exists():
        log.warning("%s has no utt2conv: examples get no context", data_dir)
        return {u: [] for u in utts}
    utt2conv = read_kaldi_map(data_dir / "utt2conv")
    utt2turn = read_kaldi_map(data_dir / "utt2turn")
    convs: dict[str, list[tuple[int, str]]] = {}
    for utt in utt2conv:
        try:
            turn = int(utt2turn[utt])
        except (KeyError, ValueError):
            raise InputError(f"{data_dir / 'utt2turn'}: missing or non-integer turn for {utt}") from None
        convs.setdefault(utt2conv[utt], []).append((turn, utt))
    history: dict[str, list[str]] = {}
    for turns in convs.values():
        ordered = [u for _, u in sorted(turns)]
        for i, utt in enumerate(ordered):
            history[utt] = ordered[:i]
    return history


LABEL_ORDERS = ("gold_first", "prompt")


@dataclass(frozen=True)
class Inventory:
    """``slot_inventory.json``: each label's description and, where given, the domains it occurs in and the
    concept it names (labels of one concept are other names of one slot)."""

    descriptions: dict[str, str]
    domains: dict[str, frozenset[str]]
    concepts: dict[str, str]

    def other_names(self, gold: Slots) -> frozenset[str]:
        """Labels that name a concept of ``gold`` differently: never a distractor for it."""
        concepts = {self.concepts[label] for label in gold if label in self.concepts}
        return frozenset(label for label, c in self.concepts.items() if c in concepts) - set(gold)


def read_inventory(path: Path) -> Inventory:
    """Each entry is a description, or ``{"description": ..., "domains": [...], "concept": ...}``."""
    entries = read_json(path)
    if not isinstance(entries, dict):
        raise InputError(f"{path}: expected an object mapping each label to its description")
    descriptions, domains, concepts = {}, {}, {}
    for label, entry in entries.items():
        if isinstance(entry, str):
            descriptions[label] = entry
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("description"), str)
                and all(isinstance(d, str) for d in entry.get("domains", []))
                and isinstance(entry.get("concept", label), str)):
            raise InputError(f"{path}: {label!r}: expected a description, or an object with 'description' (a "
                             "string), 'domains' (a list of strings) and 'concept' (a string)")
        descriptions[label] = entry["description"]
        if entry.get("domains"):
            domains[label] = frozenset(entry["domains"])
        concepts[label] = entry.get("concept", label)
    return Inventory(descriptions, domains, concepts)


def draw_prompt(rng: Random, history_text: list[str], gold: Slots, inventory: list[str],
                query_prob: float, max_context: int = 3, max_distractors: int = 5,
                label_order: str = "gold_first", exclude: Collection[str] = (),
                own_domain: Collection[str] | None = None, own_share: float = 0.8) -> Draw:
    """The prompt of one turn and the labels it queries, in the order the target lists them: the gold
    labels then the distractors (Figure 3), or with ``label_order="prompt"`` the prompt's shuffled order.

    Distractors are inventory labels outside ``gold`` and ``exclude`` (other names of the gold concepts).
    With ``own_domain`` (the labels of the turn's domain) each is drawn from it with probability
    ``own_share``, else from the other domains, as far as each side has labels left."""
    if label_order not in LABEL_ORDERS:
        raise ValueError(f"label_order must be one of {LABEL_ORDERS}, not {label_order!r}")
    n_context = min(rng.randint(0, max_context), len(history_text))
    context = history_text[len(history_text) - n_context :] if n_context else []
    queried = shown = None
    if rng.random() < query_prob:
        candidates = [label for label in inventory if label not in gold and label not in exclude]
        k = min(rng.randint(1, max_distractors), len(candidates))
        if own_domain is None:
            distractors = rng.sample(candidates, k=k)
        else:
            own = [label for label in candidates if label in own_domain]
            other = [label for label in candidates if label not in own_domain]
            n_own = min(max(sum(rng.random() < own_share for _ in range(k)), k - len(other)), len(own))
            distractors = rng.sample(own, k=n_own) + rng.sample(other, k=k - n_own)
        queried = (*gold, *distractors)
        shown = list(queried)
        rng.shuffle(shown)
        shown = tuple(shown)
        if label_order == "prompt":
            queried = shown
    template = rng.choice(prompts.TEMPLATES[(bool(context), queried is not None)])
    prompt = template.format(audio=prompts.AUDIO, context="\n".join(f"- {t}" for t in context),
                             labels=", ".join(shown or ()))
    return Draw(prompt, queried)


def target_slots(gold: Slots, queried: tuple[str, ...] | None) -> Slots:
    return dict(gold) if queried is None else {label: gold.get(label, "None") for label in queried}


def reasoning_trace(transcript: str, gold: Slots, queried: tuple[str, ...] | None,
                    descriptions: dict[str, str]) -> str:
    """The Figure-3 chain of thought: transcript, mentions, queried labels, assignment."""
    steps = [f'I hear the utterance in the audio clip is "{transcript}".']
    mentions = list(dict.fromkeys(v for value in gold.values() for v in values_of(value)))
    if mentions:
        steps.append("I see that the information bearing mentions in the utterance are "
                     + " | ".join(mentions) + ".")
    else:
        steps.append("I see no information bearing mentions in the utterance.")
    if queried is None:
        steps.append("No labels were queried, so I consider every slot label that fits.")
    else:
        steps.append("The labels queried for are " + ", ".join(queried) + ".")
    if gold:
        reasons = []
        for label, value in gold.items():
            description = descriptions.get(label)
            meaning = f"{label} ({description})" if description else label
            said = " and ".join(f'"{v}"' for v in values_of(value))
            reasons.append(f"{said} {'are' if isinstance(value, list) else 'is'} the {meaning}")
        steps.append("Based on the semantics of the slots, " + "; ".join(reasons) + ".")
        if queried is not None and len(queried) > len(gold):
            steps.append("The others are all 'None'.")
    elif queried is not None:
        steps.append("Nothing can be assigned, so all queried labels are 'None'.")
    else:
        steps.append("Nothing can be assigned, so there are no slots.")
    return "<thinking>\n" + "\n".join(steps) + "\n</thinking>\n"


def regular_target(gold: Slots, queried: tuple[str, ...] | None) -> str:
    return format_slots(target_slots(gold, queried))


def reasoning_target(transcript: str, gold: Slots, queried: tuple[str, ...] | None,
                     descriptions: dict[str, str]) -> str:
    return (reasoning_trace(transcript, gold, queried, descriptions)
            + "<response>\n" + regular_target(gold, queried) + "\n</response>")


_REASONING_RE = re.compile(r"<thinking>\n(.*)\n</thinking>\n<response>\n(.*)\n</response>", re.DOTALL)


def split_reasoning_target(target: str) -> tuple[str, str]:
    """A target's trace (``""`` for a direct answer) and its answer, without our markup: what a model
    with a thinking block of its own writes inside the block and after it."""
    match = _REASONING_RE.fullmatch(target)
    if match:
        return match.group(1), match.group(2)
    if "<thinking>" in target or "<response>" in target:
        raise ValueError(f"a reasoning target not in the form reasoning_target writes: {target[:200]!r}")
    return "", target


def dropped_utterances(utts: list[str], feats: dict[str, str], slots: dict[str, Slots],
                       dump_dir: Path) -> dict[str, str]:
    """Every utterance that cannot become an example, with the reason: text without features (stage 1
    skipped it) or without a slots line, and features or a slots line without text."""
    skipped = dump_dir / "skipped"
    by_stage1 = read_kaldi_map(skipped, allow_empty_value=True) if skipped.exists() else {}

    def reason(u: str) -> str:
        if u in feats:
            return "no slots line"
        return f"skipped by stage 1 (see {skipped})" if u in by_stage1 else "no features (not in wav.scp)"

    reasons = {u: reason(u) for u in utts if u not in feats or u not in slots}
    known = set(utts)
    reasons.update({u: "features but no line in text" for u in feats if u not in known})
    reasons.update({u: "a slots line but no line in text" for u in slots if u not in known and u not in feats})
    return reasons


def build_examples(data_dir: Path, dump_dir: Path, seed: int = 1, query_prob: float = 0.5,
                   context_source: str = "asr", label_order: str = "gold_first",
                   own_domain_share: float = 0.8) -> dict[str, list[dict]]:
    """Examples of every mode for one data dir, keyed by mode."""
    if not (dump_dir / "feats.scp").exists():
        raise InputError(f"{dump_dir / 'feats.scp'} missing: stage 1 has not completed for {data_dir} (run it)")
    feats = read_kaldi_map(dump_dir / "feats.scp")
    num_frames = read_kaldi_map(dump_dir / "utt2num_frames") if (dump_dir / "utt2num_frames").exists() else {}
    text = read_kaldi_map(data_dir / "text")
    gold_all = read_slots(data_dir / "slots.jsonl")
    utt_descriptions = read_descriptions(data_dir / "slots.jsonl")
    asr_path = dump_dir / "text_asr"
    asr = read_kaldi_map(asr_path, allow_empty_value=True) if asr_path.exists() else None
    if asr is None:
        log.warning("%s missing (stage 1 ran with --asr false): no cascade examples", asr_path)
    if context_source == "asr":
        if asr is None:
            raise InputError(f"{asr_path} missing: --context_source asr needs stage 1 with --asr true")
        context_text = asr
    elif context_source == "reference":
        context_text = text
    else:
        raise ValueError(f"context_source must be 'asr' or 'reference', got {context_source!r}")
    inventory_path = data_dir / "slot_inventory.json"
    if inventory_path.exists():
        known = read_inventory(inventory_path)
    else:
        log.warning("%s missing: the inventory is the labels seen in %s", inventory_path, data_dir)
        known = Inventory({}, {}, {})
    descriptions = known.descriptions
    inventory = sorted(set(descriptions) | {label for s in gold_all.values() for label in s})
    utt2domain = read_kaldi_map(data_dir / "utt2domain") if (data_dir / "utt2domain").exists() else {}
    own_labels = {d: frozenset(label for label, ds in known.domains.items() if d in ds)
                  for d in set(utt2domain.values())} if known.domains else {}
    n_distractors = n_own = 0

    utts = sorted(text)
    history = conversation_order(data_dir, utts)
    dropped = dropped_utterances(utts, feats, gold_all, dump_dir)
    write_kaldi_map(dump_dir / "dropped", dropped)
    if dropped:
        log.warning("%d utterances of %s are left out (listed with the reason in %s):", len(dropped), data_dir,
                    dump_dir / "dropped")
        for reason in sorted(set(dropped.values())):
            names = sorted(u for u, r in dropped.items() if r == reason)
            log.warning("  %d %s: %s%s", len(names), reason, " ".join(names[:20]), " ..." if len(names) > 20 else "")
    out: dict[str, list[dict]] = {m: [] for m in MODES if m != "cascade" or asr is not None}
    for utt in utts:
        if utt in dropped:
            continue
        gold = filled_slots(gold_all[utt])
        rng = Random(f"format-{seed}-{utt}")
        own = own_labels.get(utt2domain.get(utt, ""))
        draw = draw_prompt(rng, [context_text.get(u, "") for u in history.get(utt, [])], gold, inventory,
                           query_prob, label_order=label_order, exclude=known.other_names(gold),
                           own_domain=own, own_share=own_domain_share)
        distractors = [label for label in draw.queried or () if label not in gold]
        n_distractors += len(distractors)
        n_own += sum(label in (own or ()) for label in distractors)
        base = {"utt_id": utt, "feats": feats[utt], "n_frames": int(num_frames.get(utt, 0)), "text": text[utt],
                "queried": draw.queried,
                "slots": target_slots(gold, draw.queried)}
        regular = {**base, "mode": "regular", "prompt": draw.prompt, "target": regular_target(gold, draw.queried)}
        reasoning = {**base, "mode": "reasoning", "prompt": draw.prompt,
                     "target": reasoning_target(text[utt], gold, draw.queried,
                                                {**descriptions, **utt_descriptions.get(utt, {})})}
        out["regular"].append({"id": utt, **regular})
        out["reasoning"].append({"id": utt, **reasoning})
        out[HYBRID].append({"id": f"{utt}#no_think", **regular, "mode": decode_mode(HYBRID, False),
                            "prompt": f"{draw.prompt} {prompts.NO_THINK}"})
        out[HYBRID].append({"id": f"{utt}#think", **reasoning, "mode": decode_mode(HYBRID, True),
                            "prompt": f"{draw.prompt} {prompts.THINK}"})
        if asr is not None:
            out["cascade"].append({"id": utt, **regular, "mode": "cascade", "feats": None, "n_frames": 0,
                                   "prompt": prompts.text_prompt(draw.prompt, asr.get(utt, ""))})
    if own_labels:
        log.info("%s: %d distractor labels drawn, %d (%.1f%%) from the turn's own domain (own_domain_share %.2f)",
                 data_dir, n_distractors, n_own, 100 * n_own / max(n_distractors, 1), own_domain_share)
    return out


def write_examples(examples: dict[str, list[dict]], dump_dir: Path) -> None:
    for mode, items in examples.items():
        with atomic_write(dump_dir / f"{mode}.jsonl") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        log.info("wrote %d %s examples to %s", len(items), mode, dump_dir / f"{mode}.jsonl")
