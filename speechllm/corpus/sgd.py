"""Stage 0 of the SGD recipe: the Schema-Guided Dialogue corpus (Rastogi et al., 2020) in the shared
conversation format.

Reads the upstream layout (``<root>/{train,dev}/dialogues_*.json`` and ``schema.json``). Sets:
``train`` and ``valid`` are disjoint dialogues of upstream train; the test set ``dev`` is upstream
dev, half of its dialogues using a service that no selected training dialogue uses (zero-shot).
Dialogues are drawn round-robin over services (seeded), so small selections still cover them all.

Slots of a turn (either speaker): every span of ``frames[].slots`` (the value is the utterance's
text at the span), then, for categorical schema slots, the values of each action that carries them
(INFORM, CONFIRM, OFFER, REQUEST: SGD gives these no span, e.g. ``number_of_seats: 2`` for "two
people"). A label keeps every distinct value of the turn, several as a list (``city: ["San Jose",
"Fremont"]``); the log counts the turns that have such a label. Values of slots outside the schema
(INFORM_COUNT's ``count``, INFORM_INTENT's ``intent``) are left out and counted in the log. Labels
are schema slot names; with ``prefix_collisions`` a name used by services of two domains becomes
``<domain>_<name>`` (``hotels_address``). Each turn carries its services' descriptions of its
labels (for the reasoning trace; a label two of its services share takes the first's) and its
group: ``unseen`` when one of its frames' services is absent from the selected training
dialogues, else ``seen``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from random import Random

from speechllm.io_utils import InputError, atomic_write, read_json
from speechllm.logging_utils import setup_logging
from speechllm.slots import filled_slots

log = logging.getLogger(__name__)

UPSTREAM_ZIP = ("https://github.com/google-research-datasets/dstc8-schema-guided-dialogue/"
                "archive/refs/heads/master.zip")
SPEAKERS = {"USER": "user", "SYSTEM": "system"}
VALUE_ACTS = frozenset({"INFORM", "CONFIRM", "OFFER", "REQUEST"})


@dataclass(frozen=True)
class SchemaSlot:
    name: str
    description: str
    categorical: bool


@dataclass(frozen=True)
class Service:
    name: str
    slots: dict[str, SchemaSlot]

    @property
    def domain(self) -> str:
        return self.name.split("_")[0]


def load_json(path: Path) -> object:
    if not path.is_file():
        raise InputError(f"{path}: no such file (is --sgd_root the SGD root with train/ and dev/?)")
    return read_json(path)


def read_schema(path: Path) -> dict[str, Service]:
    entries = load_json(path)
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a JSON list of services")
    services = {}
    for i, entry in enumerate(entries):
        try:
            slots = {s["name"]: SchemaSlot(s["name"], s["description"], bool(s["is_categorical"]))
                     for s in entry["slots"]}
            services[entry["service_name"]] = Service(entry["service_name"], slots)
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}: service entry {i}: missing or malformed key {e}") from None
    return services


def read_split(root: Path, split: str) -> tuple[dict[str, Service], list[tuple[Path, dict]]]:
    """The schema and every dialogue (with its file) of one upstream split."""
    schema = read_schema(root / split / "schema.json")
    files = sorted((root / split).glob("dialogues_*.json"))
    if not files:
        raise InputError(f"{root / split}: no dialogues_*.json files")
    dialogues = []
    for path in files:
        items = load_json(path)
        if not isinstance(items, list):
            raise InputError(f"{path}: expected a JSON list of dialogues")
        for i, dialogue in enumerate(items):
            for key in ("dialogue_id", "services", "turns"):
                if key not in dialogue:
                    raise InputError(f"{path}: dialogue {dialogue.get('dialogue_id', f'#{i}')}: missing key {key!r}")
            for service in dialogue["services"]:
                if service not in schema:
                    raise InputError(f"{path}: dialogue {dialogue['dialogue_id']}: service {service!r} is not in "
                                     f"{root / split / 'schema.json'}")
            dialogues.append((path, dialogue))
    if not dialogues:
        raise InputError(f"{root / split}: its dialogues_*.json files hold no dialogues")
    return schema, dialogues


class TurnReader:
    """Turns of SGD dialogues as ``{speaker, text, slots, descriptions, services}``, counting what is left out."""

    def __init__(self, schema: dict[str, Service], collisions: frozenset[str]):
        self.schema, self.collisions = schema, collisions
        self.counts: Counter[str] = Counter()

    def label(self, service: Service, slot: str) -> str:
        return f"{service.domain.lower()}_{slot}" if slot in self.collisions else slot

    def turn(self, path: Path, dialogue_id: str, index: int, turn: dict) -> dict:
        where = f"{path}: dialogue {dialogue_id}: turn {index}"
        for key in ("speaker", "utterance", "frames"):
            if key not in turn:
                raise InputError(f"{where}: missing key {key!r}")
        if turn["speaker"] not in SPEAKERS:
            raise InputError(f"{where}: speaker must be USER or SYSTEM, got {turn['speaker']!r}")
        text = turn["utterance"]
        if not text.strip():
            raise InputError(f"{where}: empty utterance")
        values: dict[str, list[str]] = {}
        descriptions: dict[str, str] = {}
        services = []

        def add(service: Service, slot: str, value: str, source: str) -> None:
            label = self.label(service, slot)
            if value in values.setdefault(label, []):
                return
            values[label].append(value)
            descriptions.setdefault(label, service.slots[slot].description)
            self.counts[source] += 1

        for frame in turn["frames"]:
            if frame.get("service") not in self.schema:
                raise InputError(f"{where}: service {frame.get('service')!r} is not in the schema")
            service = self.schema[frame["service"]]
            services.append(service.name)
            for span in frame.get("slots", []):
                slot, start, end = span.get("slot"), span.get("start"), span.get("exclusive_end")
                if slot not in service.slots:
                    raise InputError(f"{where}: span slot {slot!r} is not a slot of {service.name}")
                if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
                    raise InputError(f"{where}: span {slot} [{start}, {end}) is outside the utterance "
                                     f"({len(text)} characters)")
                add(service, slot, text[start:end], "span values")
            for action in frame.get("actions", []):
                if not action.get("values"):
                    continue
                slot = action.get("slot")
                if action.get("act") not in VALUE_ACTS or slot not in service.slots:
                    self.counts[f"{action.get('act')} values of {slot!r} (left out)"] += 1
                elif service.slots[slot].categorical:
                    for value in action["values"]:
                        add(service, slot, str(value), "categorical values")
                elif self.label(service, slot) not in values:
                    self.counts["non-categorical action values without a span (left out)"] += 1
        self.counts["turns"] += 1
        if any(len(v) > 1 for v in values.values()):
            self.counts["turns with several values of one label (kept as a list)"] += 1
        return {"speaker": SPEAKERS[turn["speaker"]], "text": " ".join(text.split()), "slots": filled_slots(values),
                "descriptions": descriptions, "services": services}

    def dialogue(self, path: Path, dialogue: dict) -> list[dict]:
        return [self.turn(path, dialogue["dialogue_id"], i, t) for i, t in enumerate(dialogue["turns"])]


def grouped(turn: dict, seen: frozenset[str]) -> dict:
    """The turn with its group in place of its services: ``unseen`` if one is not in ``seen``."""
    row = {k: v for k, v in turn.items() if k != "services"}
    row["group"] = "unseen" if any(s not in seen for s in turn["services"]) else "seen"
    return row


def select_balanced(dialogues: list[tuple[Path, dict]], n: int, rng: Random) -> list[tuple[Path, dict]]:
    """``n`` dialogues (all when ``n < 0``), round-robin over services, each service's order shuffled."""
    if n < 0 or n >= len(dialogues):
        return list(dialogues)
    queues: dict[str, list[int]] = {}
    for i, (_, d) in enumerate(dialogues):
        for service in d["services"]:
            queues.setdefault(service, []).append(i)
    for service in sorted(queues):
        rng.shuffle(queues[service])
    chosen: list[int] = []
    taken: set[int] = set()
    while len(chosen) < n and any(queues.values()):
        for service in sorted(queues):
            queue = queues[service]
            while queue and queue[0] in taken:
                queue.pop(0)
            if queue and len(chosen) < n:
                taken.add(queue[0])
                chosen.append(queue.pop(0))
    return [dialogues[i] for i in sorted(chosen)]


def domain_collisions(*schemas: dict[str, Service]) -> frozenset[str]:
    """Slot names used by services of more than one domain."""
    domains: dict[str, set[str]] = {}
    for schema in schemas:
        for service in schema.values():
            for slot in service.slots:
                domains.setdefault(slot, set()).add(service.domain)
    return frozenset(name for name, ds in domains.items() if len(ds) > 1)


def inventory(schema: dict[str, Service], reader: TurnReader) -> dict[str, str]:
    """Every label of a split's schema with a description (the first service's, in schema order)."""
    out: dict[str, str] = {}
    for service in schema.values():
        for slot in service.slots.values():
            out.setdefault(reader.label(service, slot.name), slot.description)
    return dict(sorted(out.items()))


def prepare(root: Path, outdir: Path, num_train: int, num_valid: int, num_test: int, seed: int = 1,
            prefix_collisions: bool = False) -> dict[str, int]:
    """Write ``conversations.jsonl`` and ``slot_inventory.<set>.json``; return turns per set."""
    train_schema, train_dialogues = read_split(root, "train")
    dev_schema, dev_dialogues = read_split(root, "dev")
    collisions = domain_collisions(train_schema, dev_schema) if prefix_collisions else frozenset()
    readers = {"train": TurnReader(train_schema, collisions), "dev": TurnReader(dev_schema, collisions)}
    # every dialogue is converted (and so checked), whichever are selected
    turns = {id(d): readers[split].dialogue(path, d)
             for split, items in (("train", train_dialogues), ("dev", dev_dialogues)) for path, d in items}
    rng = Random(f"sgd-{seed}")
    if num_train < 0:  # all of upstream train but the validation dialogues held out of it
        valid = select_balanced(train_dialogues, num_valid, rng)
        held = {id(d) for _, d in valid}
        train = [item for item in train_dialogues if id(item[1]) not in held]
    else:
        train = select_balanced(train_dialogues, num_train, rng)
        taken = {id(d) for _, d in train}
        valid = select_balanced([item for item in train_dialogues if id(item[1]) not in taken], num_valid, rng)
    seen = frozenset(s for _, d in train for s in d["services"])
    unseen_dialogues, seen_dialogues = [], []
    for item in dev_dialogues:
        is_unseen = any(s not in seen for s in item[1]["services"])
        (unseen_dialogues if is_unseen else seen_dialogues).append(item)
    if num_test < 0:
        test = dev_dialogues
    else:
        test = (select_balanced(unseen_dialogues, (num_test + 1) // 2, rng)
                + select_balanced(seen_dialogues, num_test // 2, rng))
    sets = (("train", "train", train), ("valid", "train", valid), ("dev", "dev", test))
    outdir.mkdir(parents=True, exist_ok=True)
    turns_per_set: dict[str, int] = {}
    with atomic_write(outdir / "conversations.jsonl") as f:
        for name, upstream, chosen in sets:
            n_turns = 0
            for _, dialogue in chosen:
                rows = [grouped(t, seen) for t in turns[id(dialogue)]]
                n_turns += len(rows)
                f.write(json.dumps({"conv_id": f"{upstream}-{dialogue['dialogue_id']}", "split": name,
                                    "domain": "+".join(dialogue["services"]), "turns": rows},
                                   ensure_ascii=False) + "\n")
            turns_per_set[name] = n_turns
            log.info("%s: %d dialogues, %d turns (upstream %s)", name, len(chosen), n_turns, upstream)
    for name, upstream, _ in sets:
        schema = train_schema if upstream == "train" else dev_schema
        with atomic_write(outdir / f"slot_inventory.{name}.json") as f:
            json.dump(inventory(schema, readers[upstream]), f, indent=1, ensure_ascii=False)
    log.info("services seen in training: %s; unseen in dev: %s", ", ".join(sorted(seen)),
             ", ".join(sorted(set(dev_schema) - seen)) or "none")
    for upstream, reader in readers.items():
        for what, count in sorted(reader.counts.items()):
            log.info("upstream %s: %d %s", upstream, count, what)
    return turns_per_set


def download(root: Path) -> None:
    """Fetch and unpack the upstream release into ``root`` (``root/train``, ``root/dev``...)."""
    log.info("downloading %s", UPSTREAM_ZIP)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "sgd.zip"
        try:
            with urllib.request.urlopen(UPSTREAM_ZIP, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            raise InputError(f"cannot download the SGD release from {UPSTREAM_ZIP} ({e}); offline, pass a local copy: "
                             "--sgd_root /path/to/sgd (with train/ and dev/)") from None
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        top = next(p for p in Path(tmp).iterdir() if p.is_dir())
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(top), root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sgd_root", type=Path, required=True, help="SGD root holding train/ and dev/")
    parser.add_argument("--download", action="store_true", help="download the upstream release if root is empty")
    parser.add_argument("--outdir", type=Path, required=True)
    parser.add_argument("--num_train", type=int, default=-1, help="training dialogues (-1: all)")
    parser.add_argument("--num_valid", type=int, default=20, help="validation dialogues, from upstream train")
    parser.add_argument("--num_test", type=int, default=-1, help="test dialogues from upstream dev (-1: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefix_collisions", choices=("true", "false"), default="false",
                        help="prefix the domain to slot names shared by several domains")
    args = parser.parse_args(argv)
    setup_logging()
    if args.download and not (args.sgd_root / "train" / "schema.json").exists():
        download(args.sgd_root)
    prepare(args.sgd_root, args.outdir, args.num_train, args.num_valid, args.num_test, args.seed,
            args.prefix_collisions == "true")


if __name__ == "__main__":
    main()
