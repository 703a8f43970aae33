"""The SGD reader (stage 0 of egs/sgd/sf1) on a small corpus in the upstream format written here."""

import json
import logging
import re
from pathlib import Path

import pytest

from speechllm.bin.score import score_files
from speechllm.corpus.sgd import prepare
from speechllm.corpus.synth import build_data_dirs
from speechllm.formatting import build_examples
from speechllm.io_utils import InputError, read_descriptions, read_kaldi_map, read_slots


def slot(name, description, categorical=False, values=()):
    return {"name": name, "description": description, "is_categorical": categorical, "possible_values": list(values)}


SCHEMAS = {
    "train": [
        {"service_name": "Restaurants_1", "description": "Find restaurants", "intents": [],
         "slots": [slot("city", "City where the restaurant is"), slot("cuisine", "Type of food served"),
                   slot("party_size", "Number of people", True, ["1", "2", "3", "4"])]},
        {"service_name": "Hotels_1", "description": "Find hotels", "intents": [],
         "slots": [slot("city", "City where the hotel is"), slot("star_rating", "Stars", True, ["1", "2", "3"])]},
    ],
    "dev": [
        {"service_name": "Restaurants_1", "description": "Find restaurants", "intents": [],
         "slots": [slot("city", "City where the restaurant is"), slot("cuisine", "Type of food served"),
                   slot("party_size", "Number of people", True, ["1", "2", "3", "4"])]},
        {"service_name": "Banks_2", "description": "Transfer money", "intents": [],
         "slots": [slot("amount", "Amount of money to transfer"),
                   slot("account_type", "Type of the account", True, ["checking", "savings"])]},
    ],
}


def span(text, value, name):
    start = text.index(value)
    return {"slot": name, "start": start, "exclusive_end": start + len(value)}


def act(name, slot_name="", values=()):
    return {"act": name, "slot": slot_name, "values": list(values), "canonical_values": list(values)}


def turn(speaker, text, service, spans=(), actions=()):
    return {"speaker": speaker, "utterance": text,
            "frames": [{"service": service, "slots": [span(text, v, s) for s, v in spans], "actions": list(actions)}]}


def restaurant_dialogue(dialogue_id, city):
    return {"dialogue_id": dialogue_id, "services": ["Restaurants_1"], "turns": [
        turn("USER", f"Find me a Thai place in {city}.", "Restaurants_1",
             [("cuisine", "Thai"), ("city", city)],
             [act("INFORM_INTENT", "intent", ["FindRestaurants"]), act("INFORM", "cuisine", ["Thai"]),
              act("INFORM", "city", [city])]),
        turn("SYSTEM", f"I found 3 restaurants. Baan Thai is nice, in {city}.", "Restaurants_1", [("city", city)],
             [act("INFORM_COUNT", "count", ["3"]), act("OFFER", "city", [city])]),
        turn("USER", "Book it for two people.", "Restaurants_1", (), [act("INFORM", "party_size", ["2"])]),
        turn("SYSTEM", "Done. Anything else?", "Restaurants_1", (), [act("REQ_MORE")]),
    ]}


def hotel_dialogue(dialogue_id):
    return {"dialogue_id": dialogue_id, "services": ["Hotels_1"], "turns": [
        turn("USER", "I need a three star hotel in Paris.", "Hotels_1", [("city", "Paris")],
             [act("INFORM", "star_rating", ["3"]), act("INFORM", "city", ["Paris"])]),
        turn("SYSTEM", "The Ritz in Paris is free.", "Hotels_1", [("city", "Paris")], [act("OFFER", "city", ["Paris"])]),
    ]}


def bank_dialogue(dialogue_id):
    return {"dialogue_id": dialogue_id, "services": ["Banks_2"], "turns": [
        turn("USER", "Send 40 dollars from my savings.", "Banks_2", [("amount", "40 dollars")],
             [act("INFORM", "amount", ["40 dollars"]), act("INFORM", "account_type", ["savings"])]),
        turn("SYSTEM", "Please confirm: 40 dollars from savings.", "Banks_2", [("amount", "40 dollars")],
             [act("CONFIRM", "amount", ["40 dollars"]), act("CONFIRM", "account_type", ["savings"])]),
    ]}


def write_corpus(root: Path, dialogues: dict | None = None) -> Path:
    dialogues = dialogues or {
        "train": [restaurant_dialogue("1_00001", "Oakland"), hotel_dialogue("1_00002"),
                  restaurant_dialogue("1_00003", "Fresno")],
        "dev": [restaurant_dialogue("1_00001", "Napa"), bank_dialogue("1_00002")],
    }
    for split, items in dialogues.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "schema.json").write_text(json.dumps(SCHEMAS[split], indent=2))
        (root / split / "dialogues_001.json").write_text(json.dumps(items, indent=2))
    return root


def conversations(outdir: Path) -> dict[str, dict]:
    return {c["conv_id"]: c for c in map(json.loads, (outdir / "conversations.jsonl").read_text().splitlines())}


def test_turns_slots_descriptions_and_groups(tmp_path, caplog):
    root = write_corpus(tmp_path / "sgd")
    with caplog.at_level(logging.INFO):
        counts = prepare(root, tmp_path / "out", num_train=2, num_valid=1, num_test=-1)
    convs = conversations(tmp_path / "out")
    assert {c["split"] for c in convs.values()} == {"train", "valid", "dev"}
    assert counts["dev"] == 6 and counts["train"] + counts["valid"] == 10
    # the hotel service must be in train: the round-robin over services takes one dialogue of each
    assert "train-1_00002" in convs and convs["train-1_00002"]["split"] == "train"
    napa = convs["dev-1_00001"]["turns"]
    assert [t["speaker"] for t in napa] == ["user", "system", "user", "system"]  # upstream order
    assert napa[0]["text"] == "Find me a Thai place in Napa."
    assert napa[0]["slots"] == {"cuisine": "Thai", "city": "Napa"}  # spans: the utterance's own text
    assert napa[1]["slots"] == {"city": "Napa"}  # INFORM_COUNT's count is not a schema slot
    assert napa[2]["slots"] == {"party_size": "2"}  # a categorical value from the action
    assert napa[3]["slots"] == {}
    assert napa[0]["descriptions"] == {"cuisine": "Type of food served", "city": "City where the restaurant is"}
    assert convs["train-1_00002"]["turns"][0]["descriptions"]["city"] == "City where the hotel is"
    assert convs["train-1_00002"]["turns"][0]["slots"] == {"city": "Paris", "star_rating": "3"}
    bank = convs["dev-1_00002"]["turns"]
    assert bank[1]["slots"] == {"amount": "40 dollars", "account_type": "savings"}
    assert {t["group"] for t in bank} == {"unseen"} and {t["group"] for t in napa} == {"seen"}
    log = caplog.text
    assert "upstream dev: 1 INFORM_COUNT values of 'count' (left out)" in log
    assert "upstream dev: 1 INFORM_INTENT values of 'intent' (left out)" in log
    assert "upstream dev: 3 categorical values" in log and "upstream dev: 5 span values" in log
    assert "unseen in dev: Banks_2" in log
    # each split's inventory is its own schema: train never sees the unseen service's labels
    train_inventory = json.loads((tmp_path / "out" / "slot_inventory.train.json").read_text())
    dev_inventory = json.loads((tmp_path / "out" / "slot_inventory.dev.json").read_text())
    assert set(train_inventory) == {"city", "cuisine", "party_size", "star_rating"}
    assert set(dev_inventory) == {"city", "cuisine", "party_size", "amount", "account_type"}


def test_all_of_train_still_holds_out_the_validation_dialogues(tmp_path):
    root = write_corpus(tmp_path / "sgd")
    counts = prepare(root, tmp_path / "out", num_train=-1, num_valid=1, num_test=-1)
    splits = [c["split"] for c in conversations(tmp_path / "out").values() if c["conv_id"].startswith("train")]
    assert sorted(splits) == ["train", "train", "valid"]  # the three upstream training dialogues
    assert counts["train"] + counts["valid"] == 10 and counts["valid"] > 0


def test_domain_prefix_on_colliding_names(tmp_path):
    root = write_corpus(tmp_path / "sgd")
    prepare(root, tmp_path / "out", num_train=-1, num_valid=0, num_test=-1, prefix_collisions=True)
    convs = conversations(tmp_path / "out")
    assert convs["train-1_00002"]["turns"][0]["slots"] == {"hotels_city": "Paris", "star_rating": "3"}
    assert convs["dev-1_00001"]["turns"][0]["slots"] == {"cuisine": "Thai", "restaurants_city": "Napa"}


def test_data_dirs_context_and_schema_distractors(tmp_path):
    root = write_corpus(tmp_path / "sgd")
    out = tmp_path / "out"
    prepare(root, out, num_train=2, num_valid=1, num_test=-1)
    build_data_dirs(out / "conversations.jsonl", str(out / "slot_inventory.{split}.json"), tmp_path / "wav",
                    tmp_path / "data", nj=2)
    dev = tmp_path / "data" / "dev"
    text, groups = read_kaldi_map(dev / "text"), read_kaldi_map(dev / "utt2group")
    assert sorted(text) == ["dev-1_00001_system_001", "dev-1_00001_system_003", "dev-1_00001_user_000",
                            "dev-1_00001_user_002", "dev-1_00002_system_001", "dev-1_00002_user_000"]
    assert groups["dev-1_00002_user_000"] == "unseen" and groups["dev-1_00001_user_000"] == "seen"
    assert read_slots(dev / "slots.jsonl")["dev-1_00001_user_002"] == {"party_size": "2"}
    assert read_descriptions(dev / "slots.jsonl")["dev-1_00002_user_000"]["amount"] == "Amount of money to transfer"
    spk = read_kaldi_map(dev / "utt2spk")
    assert spk["dev-1_00001_user_000"] == "dev-1_00001_user"

    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "feats.scp").write_text("".join(f"{u} feats.ark:{i}\n" for i, u in enumerate(sorted(text))))
    order = {"dev-1_00001": [f"dev-1_00001_{s}_{t:03d}" for t, s in enumerate(("user", "system") * 2)]}
    seen_contexts = set()
    for seed in range(40):
        rows = build_examples(dev, dump, seed=seed, query_prob=1.0, context_source="reference")["regular"]
        for row in rows:
            utt = row["utt_id"]
            context = [line[2:] for line in row["prompt"].splitlines() if line.startswith("- ")]
            if utt in order["dev-1_00001"]:
                previous = [text[u] for u in order["dev-1_00001"][: order["dev-1_00001"].index(utt)]]
                assert context == previous[len(previous) - len(context):]  # the latest turns, in order
                seen_contexts.add(len(context))
            distractors = set(row["queried"]) - set(read_slots(dev / "slots.jsonl")[utt])
            assert distractors <= {"city", "cuisine", "party_size", "amount", "account_type"}
            assert "star_rating" not in row["queried"]  # a train-only service's label
    assert seen_contexts == {0, 1, 2, 3}
    reasoning = build_examples(dev, dump, seed=1, query_prob=0.0, context_source="reference")["reasoning"]
    bank = next(r for r in reasoning if r["utt_id"] == "dev-1_00002_user_000")
    assert '"40 dollars" is the amount (Amount of money to transfer)' in bank["target"]


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["dev"][0]["turns"][0]["frames"][0]["slots"][0].update(exclusive_end=500),
     r"dev/dialogues_001.json: dialogue 1_00001: turn 0: span cuisine \[10, 500\) is outside the utterance"),
    (lambda d: d["dev"][1].update(services=["Weather_1"]),
     r"dev/dialogues_001.json: dialogue 1_00002: service 'Weather_1' is not in .*dev/schema.json"),
    (lambda d: d["train"][1]["turns"][1]["frames"][0].update(service="Movies_1"),
     r"train/dialogues_001.json: dialogue 1_00002: turn 1: service 'Movies_1' is not in the schema"),
    (lambda d: d["train"][0]["turns"][0].pop("utterance"),
     r"train/dialogues_001.json: dialogue 1_00001: turn 0: missing key 'utterance'"),
])
def test_malformed_input_names_file_and_dialogue(tmp_path, breakage, message):
    dialogues = {"train": [restaurant_dialogue("1_00001", "Oakland"), hotel_dialogue("1_00002")],
                 "dev": [restaurant_dialogue("1_00001", "Napa"), bank_dialogue("1_00002")]}
    breakage(dialogues)
    root = write_corpus(tmp_path / "sgd", dialogues)
    with pytest.raises(InputError, match=message):
        prepare(root, tmp_path / "out", num_train=1, num_valid=0, num_test=-1)


def test_missing_files_are_named(tmp_path):
    root = write_corpus(tmp_path / "sgd")
    (root / "dev" / "schema.json").unlink()
    with pytest.raises(InputError, match=re.escape(f"{root / 'dev' / 'schema.json'}: no such file")):
        prepare(root, tmp_path / "out", 1, 0, -1)
    empty = write_corpus(tmp_path / "empty", {"train": [], "dev": []})
    with pytest.raises(InputError, match=re.escape(f"{empty / 'train'}: its dialogues_*.json files hold no")):
        prepare(empty, tmp_path / "out", 1, 0, -1)
    (empty / "train" / "dialogues_001.json").unlink()
    with pytest.raises(InputError, match=re.escape(f"{empty / 'train'}: no dialogues_*.json files")):
        prepare(empty, tmp_path / "out", 1, 0, -1)
    (root / "dev" / "schema.json").write_text("[\n{]")
    with pytest.raises(InputError, match=r"dev/schema.json:2: malformed JSON"):
        prepare(root, tmp_path / "out", 1, 0, -1)


def test_scores_are_split_by_group(tmp_path):
    rows = [("u1", {"city": "Napa"}), ("u2", {"amount": "40 dollars"}), ("u3", {"cuisine": "Thai"})]
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"id": u, "utt_id": u, "feats": None, "prompt": "", "target": "", "slots": s})
                           + "\n" for u, s in rows))
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text("".join(json.dumps({"id": u, "slots": s}) + "\n"
                           for u, s in [("u1", {"city": "Napa"}), ("u2", {"amount": "12"}), ("u3", {})]))
    groups = tmp_path / "utt2group"
    groups.write_text("u1 seen\nu2 unseen\nu3 seen\n")
    result = score_files(ref, hyp, utt2group=groups)
    assert result["exact"]["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert result["groups"]["seen"]["exact"] == pytest.approx(
        {"tp": 1, "fp": 0, "fn": 1, "precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    assert result["groups"]["unseen"]["exact"]["f1"] == 0.0 and result["groups"]["unseen"]["n_utts"] == 1
    groups.write_text("u1 seen\n")
    with pytest.raises(InputError, match="no group for 2 utterances"):
        score_files(ref, hyp, utt2group=groups)


def test_offline_download_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    import speechllm.corpus.sgd as sgd

    downloads = []

    def offline(*args, **kwargs):
        downloads.append(args[0])
        raise OSError("Name or service not known")

    monkeypatch.setattr(sgd.urllib.request, "urlopen", offline)
    with pytest.raises(InputError, match=r"cannot download the SGD release .*pass a local copy: --sgd_root"):
        sgd.main(["--sgd_root", str(tmp_path / "sgd"), "--download", "--outdir", str(tmp_path / "out")])
    assert downloads == [sgd.UPSTREAM_ZIP]
    assert not (tmp_path / "sgd").exists() and not (tmp_path / "out").exists()  # nothing half-made is left
    # a root that holds the corpus is used as it is, without downloading: what the reader makes of it
    local = write_corpus(tmp_path / "local")
    corpus = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    sgd.main(["--sgd_root", str(local), "--download", "--outdir", str(tmp_path / "out"), "--num_train", "2",
              "--num_valid", "1"])
    assert downloads == [sgd.UPSTREAM_ZIP] and {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == corpus
    prepare(local, tmp_path / "direct", num_train=2, num_valid=1, num_test=-1)  # main's defaults otherwise
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "direct").iterdir())
    for name in written:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    # the 3 upstream train dialogues (2 for train, 1 held out for valid) and the 2 dev ones (--num_test -1)
    splits = sorted(c["split"] for c in conversations(tmp_path / "out").values())
    assert splits == ["dev", "dev", "train", "train", "valid"]


def test_a_label_keeps_every_value_of_a_turn_as_a_list_and_such_turns_are_counted(tmp_path, caplog):
    two_cities = {"dialogue_id": "1_00009", "services": ["Restaurants_1", "Hotels_1"], "turns": [
        {"speaker": "USER", "utterance": "Dinner in Napa, then a hotel in Paris.", "frames": [
            {"service": "Restaurants_1", "slots": [span("Dinner in Napa, then a hotel in Paris.", "Napa", "city")],
             "actions": []},
            {"service": "Hotels_1", "slots": [span("Dinner in Napa, then a hotel in Paris.", "Paris", "city")],
             "actions": []}]}]}
    dialogues = {"train": [two_cities, hotel_dialogue("1_00002")], "dev": [bank_dialogue("1_00001")]}
    root = write_corpus(tmp_path / "sgd", dialogues)
    with caplog.at_level(logging.INFO):
        prepare(root, tmp_path / "plain", num_train=-1, num_valid=0, num_test=-1)
    first = conversations(tmp_path / "plain")["train-1_00009"]["turns"][0]
    assert first["slots"] == {"city": ["Napa", "Paris"]}  # in the order of the frames
    assert first["descriptions"] == {"city": "City where the restaurant is"}  # the first service's
    assert "upstream train: 1 turns with several values of one label (kept as a list)" in caplog.text
    prepare(root, tmp_path / "prefixed", num_train=-1, num_valid=0, num_test=-1, prefix_collisions=True)
    assert conversations(tmp_path / "prefixed")["train-1_00009"]["turns"][0]["slots"] == {
        "restaurants_city": "Napa", "hotels_city": "Paris"}
