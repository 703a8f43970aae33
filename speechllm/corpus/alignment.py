"""The alignment corpus: a seeded, unlimited stream of call-centre turns with freshly drawn values,
for the CTC alignment phase (:mod:`speechllm.align`).

A recipe's own training turns name each value a handful of times (the call centre has 30 first and
30 last names), so a CTC head trained on them alone never learns to hear a name it was not taught.
This stream keeps the call centre's turn shapes but draws names, streets and cities from Faker's
English person and place inventories (thousands of names); amounts, dates, times and digit strings
are drawn afresh as in the recipe. Only turns that carry a slot value are kept: the fixed phrases
are plentiful in the training turns already.

Calls are a pure function of ``(seed, index)``: a corpus of N calls is a prefix of one of N + M calls,
so a larger corpus extends a smaller one and keeps its wavs (stage 1 encodes the features again).
Sentences of held-out sets are removed where the corpus is read (:func:`speechllm.align.corpus_turns`),
since one corpus serves every recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import lru_cache
from pathlib import Path

from faker.providers.geo import Provider as GeoProvider
from faker.providers.person import en_GB, en_IE, en_IN, en_NZ, en_US

from speechllm.corpus import values as V
from speechllm.corpus.callcenter import generate_call, slot_inventory
from speechllm.io_utils import atomic_write

log = logging.getLogger(__name__)

PERSON_LOCALES = (en_US, en_GB, en_IE, en_IN, en_NZ)


def _words(names) -> tuple[str, ...]:
    """Sorted names that espeak-ng and the slot metrics read as plain words (letters and spaces)."""
    return tuple(sorted({n for n in names if n.isascii() and n.replace(" ", "").isalpha()}))


@lru_cache(maxsize=1)
def wide_inventory() -> V.Inventory:
    """Faker's English first and last names (several locales) and its world place names."""
    first, last = set(), set()
    for locale in PERSON_LOCALES:
        for attr in ("first_names", "first_names_male", "first_names_female"):
            first.update(getattr(locale.Provider, attr, ()))
        last.update(getattr(locale.Provider, "last_names", ()))
    last_names = _words(last)
    return V.Inventory(first_names=_words(first), last_names=last_names,
                       streets=tuple(sorted({*last_names, *V.STREETS})),
                       cities=_words(place[2] for place in GeoProvider.land_coords))


def alignment_call(seed: int, index: int) -> dict:
    """Call ``index`` of the stream: the call centre's shapes, wide values, only turns with slots."""
    with V.drawing_from(wide_inventory()):
        call = generate_call(seed, index, stream="alignment")
    turns = [t for t in call["turns"] if t["slots"]]
    return {"conv_id": f"al{seed:02d}{index:06d}", "split": "align", "domain": call["domain"], "turns": turns}


def write_corpus(outdir: Path, num_calls: int, seed: int) -> int:
    """Write ``conversations.jsonl`` (calls ``0 .. num_calls - 1``) and ``slot_inventory.json``; return how
    many turns the calls hold."""
    outdir.mkdir(parents=True, exist_ok=True)
    n_turns = 0
    with atomic_write(outdir / "conversations.jsonl") as f:
        for index in range(num_calls):
            call = alignment_call(seed, index)
            n_turns += len(call["turns"])
            f.write(json.dumps(call, ensure_ascii=False) + "\n")
    with atomic_write(outdir / "slot_inventory.json") as f:
        json.dump(slot_inventory(), f, indent=1, ensure_ascii=False)
    names = wide_inventory()
    log.info("wrote %d alignment calls (%d turns with slot values; %d first names, %d last names, %d cities "
             "to draw from) to %s", num_calls, n_turns, len(names.first_names), len(names.last_names),
             len(names.cities), outdir)
    return n_turns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--num_calls", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    write_corpus(args.outdir, args.num_calls, args.seed)


if __name__ == "__main__":
    main()
