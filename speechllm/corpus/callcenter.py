"""Seeded generator of agent-customer calls with turn-level slot labels.

Each call opens with a greeting and a customer request, continues with agent questions and
customer answers, reads values back (slots that refer to earlier turns), sometimes corrects one,
and closes. Every slot value occurs verbatim in its turn's text.

Labels are open-ended, as the paper's were: each call names each slot concept by one of its names
(``callcenter_domains.ALIASES``), drawn from a RNG of its own, so that the same concept appears under
several labels across calls while the calls' text and values do not depend on the naming.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from random import Random

from speechllm.corpus.callcenter_domains import (AFFIRM, ALIASES, ANSWERS, ASKS, CLOSE_AGENT, CLOSE_CUSTOMER,
                                                 CONFIRM_ONE, CONFIRM_TWO, CORRECTION_ACKS, CORRECTIONS,
                                                 DOMAINS, GOODBYES, GREETINGS, Domain, SlotType)
from speechllm.corpus.values import FIRST_NAMES
from speechllm.io_utils import atomic_write

log = logging.getLogger(__name__)


def _answer(rng: Random, slot: SlotType, value: str) -> str:
    templates = slot.answers if slot.answers and rng.random() < 0.5 else ANSWERS
    return rng.choice(templates).format(v=value, phrase=slot.phrase)


def generate_call(seed: int, index: int, stream: str = "callcenter") -> dict:
    """One call; a pure function of ``(seed, index)`` and the name of the ``stream`` of calls."""
    rng = Random(f"{stream}-{seed}-{index}")
    domain: Domain = DOMAINS[rng.choice(sorted(DOMAINS))]
    slot_by_label = {s.label: s for s in domain.slots}
    turns: list[dict] = []
    said: dict[str, str] = {}

    def add(speaker: str, text: str, slots: dict[str, str]) -> None:
        for label, value in slots.items():
            assert value in text, (text, value)
        turns.append({"speaker": speaker, "text": text, "slots": dict(slots)})
        said.update(slots)

    agent = rng.choice(FIRST_NAMES)  # the company's staff: the call centre's names in every stream
    add("agent", rng.choice(GREETINGS).format(company=rng.choice(domain.companies), agent=agent), {})

    opening = rng.choice(domain.openings)
    label = opening[opening.index("{") + 1 : opening.index("}")]
    value = slot_by_label[label].draw(rng)
    add("customer", opening.replace("{" + label + "}", value), {label: value})

    remaining = [s for s in domain.slots if s.label not in said and s.label != "customer_name"]
    rng.shuffle(remaining)
    if rng.random() < 0.7:  # identity check first, as real agents do
        remaining.insert(0, slot_by_label["customer_name"])
    for slot in remaining[: rng.randint(3, 6)]:
        if slot.label in said:
            continue
        add("agent", rng.choice(ASKS).format(phrase=slot.phrase), {})
        value = slot.draw(rng)
        text, slots = _answer(rng, slot, value), {slot.label: value}
        extra = [s for s in remaining if s.label not in said and s is not slot]
        if extra and rng.random() < 0.25:
            other = rng.choice(extra)
            other_value = other.draw(rng)
            text += f" And the {other.phrase} is {other_value}."
            slots[other.label] = other_value
        add("customer", text, slots)

    # read back one or two earlier values: the slots of this turn refer to earlier turns
    labels = rng.sample(sorted(said), k=min(len(said), rng.choice([1, 2])))
    if len(labels) == 1:
        text = rng.choice(CONFIRM_ONE).format(p1=slot_by_label[labels[0]].phrase, v1=said[labels[0]])
    else:
        text = rng.choice(CONFIRM_TWO).format(p1=slot_by_label[labels[0]].phrase, v1=said[labels[0]],
                                              p2=slot_by_label[labels[1]].phrase, v2=said[labels[1]])
    add("agent", text, {label: said[label] for label in labels})
    if rng.random() < 0.3:
        slot = slot_by_label[labels[0]]
        value = slot.draw(rng)
        if value != said[slot.label]:
            add("customer", rng.choice(CORRECTIONS).format(p=slot.phrase, v=value), {slot.label: value})
            add("agent", rng.choice(CORRECTION_ACKS).format(p=slot.phrase, v=value), {slot.label: value})
        else:
            add("customer", rng.choice(AFFIRM), {})
    else:
        add("customer", rng.choice(AFFIRM), {})

    add("agent", rng.choice(CLOSE_AGENT), {})
    add("customer", rng.choice(CLOSE_CUSTOMER), {})
    if "customer_name" in said:
        name = said["customer_name"]
        add("agent", rng.choice(GOODBYES).format(name=name), {"customer_name": name})
    else:
        add("agent", "Thank you for calling. Have a great day.", {})
    names = call_labels(seed, index, domain)
    for turn in turns:
        turn["slots"] = {names[label]: value for label, value in turn["slots"].items()}
    return {"conv_id": f"cc{seed:02d}{index:05d}", "domain": domain.name, "turns": turns}


def call_labels(seed: int, index: int, domain: Domain) -> dict[str, str]:
    """The name each slot concept of ``domain`` goes by in call ``index``: its label or one of its aliases."""
    rng = Random(f"callcenter-labels-{seed}-{index}")
    return {slot.label: rng.choice((slot.label, *ALIASES[slot.label])) for slot in domain.slots}


def slot_inventory() -> dict[str, dict]:
    """Every name of every slot concept: its description, the domains it occurs in and its concept (the
    concept's first label), so that stage 2 can draw distractors from the turn's own domain and never
    query another name of a concept the turn holds."""
    inventory: dict[str, dict] = {}
    for domain in sorted(DOMAINS):
        for slot in DOMAINS[domain].slots:
            for name in (slot.label, *ALIASES[slot.label]):
                entry = inventory.setdefault(name, {"description": slot.description, "domains": [],
                                                    "concept": slot.label})
                entry["domains"].append(domain)
    return inventory


def generate_corpus(outdir: Path, num_calls: int, num_dev: int, num_test: int, seed: int) -> None:
    """Write ``conversations.jsonl`` (test calls first, then dev, then train) and ``slot_inventory.json``."""
    if num_calls <= num_dev + num_test:
        raise ValueError(f"--num_calls {num_calls} leaves no training calls after {num_dev} dev + {num_test} test")
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_write(outdir / "conversations.jsonl") as f:
        for index in range(num_calls):
            call = generate_call(seed, index)
            call["split"] = "test" if index < num_test else "dev" if index < num_test + num_dev else "train"
            f.write(json.dumps(call, ensure_ascii=False) + "\n")
    with atomic_write(outdir / "slot_inventory.json") as f:
        json.dump(slot_inventory(), f, indent=1, ensure_ascii=False)
    log.info("wrote %d calls (%d dev, %d test) to %s", num_calls, num_dev, num_test, outdir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--num_calls", type=int, default=300)
    parser.add_argument("--num_dev", type=int, default=20)
    parser.add_argument("--num_test", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    generate_corpus(args.outdir, args.num_calls, args.num_dev, args.num_test, args.seed)


if __name__ == "__main__":
    main()
