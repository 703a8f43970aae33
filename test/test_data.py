"""Stage-2 rows tokenised once into memory-mapped arrays give back exactly what tokenising each row
gives, are reused while nothing changed, and are rebuilt when the file or the tokenizer changes."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import make_tiny_speechllm, write_examples
from speechllm.data import TokenizedSet, bucketed_batches, load_feats, read_examples, tokenized
from speechllm.io_utils import InputError

ROWS = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind the slots." + " Context: yes." * (i % 3),
         "target": json.dumps({"amount": f"{i} dollars"}), "text": f"{i} dollars", "slots": {"amount": f"{i} dollars"},
         "n_frames_to_make": 20 + i} for i in range(7)]


@pytest.fixture
def setup(tmp_path):
    jsonl = write_examples(tmp_path, [dict(r) for r in ROWS])
    model, _, _ = make_tiny_speechllm(tmp_path, [t for r in ROWS for t in (r["prompt"], r["target"])])
    return model, jsonl


def test_tokenised_rows_equal_the_rows_tokenised_one_by_one(tmp_path, setup):
    model, jsonl = setup
    data = tokenized(model, jsonl, tmp_path / "tokens")
    examples = read_examples(jsonl)
    assert len(data) == len(examples) == 7
    for i, e in enumerate(examples):
        encoded, text = data[i]
        before, after, target = model.formatter.tokenize(e.prompt, e.target)
        assert (encoded.before, encoded.after, encoded.target) == (before, after, target)
        assert target[-1] == model.tokenizer.eos_token_id and text == e.text
        assert torch.equal(encoded.feats, load_feats(e)) and data.example(i) == e
        assert data.lengths(4)[i] == len(before) + len(after) + len(target) + e.n_frames // 4
    assert int(data.n_target.max()) == max(len(data[i][0].target) for i in range(7))
    assert len(tokenized(model, jsonl, tmp_path / "first3", limit=3)) == 3


def test_tokenised_rows_are_reused_until_the_file_or_the_tokenizer_changes(tmp_path, setup):
    model, jsonl = setup
    directory = tmp_path / "tokens"
    tokenized(model, jsonl, directory)
    written = (directory / "tokens.bin").stat().st_mtime_ns
    tokenized(model, jsonl, directory)
    assert (directory / "tokens.bin").stat().st_mtime_ns == written  # reused

    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(lines[:4]) + "\n")  # the stage-2 file was redone
    with pytest.raises(InputError, match="changed after it was tokenised"):
        TokenizedSet(directory).example(0)  # a set opened on the old tokens never pairs them with new rows
    assert len(tokenized(model, jsonl, directory)) == 4

    model.formatter.cfg.system_prompt = "You fill slots."  # another prompt rendering: other ids
    data = tokenized(model, jsonl, directory)
    first = read_examples(jsonl)[0]
    assert data[0][0].before == model.formatter.tokenize(first.prompt, first.target)[0]


def test_a_bad_row_is_named_with_its_file_and_line(tmp_path, setup):
    model, jsonl = setup
    lines = jsonl.read_text().splitlines()
    row = json.loads(lines[2])
    del row["target"]
    lines[2] = json.dumps(row)
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{jsonl}:3: missing key\(s\) \['target'\]"):
        tokenized(model, jsonl, tmp_path / "tokens")
    jsonl.write_text("")
    with pytest.raises(InputError, match="no examples"):
        tokenized(model, jsonl, tmp_path / "empty")
    assert not os.path.exists(tmp_path / "empty" / "meta.json")


def reference_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket_batches: int) -> list:
    """The plan written the plain way: shuffle, sort each chunk by length, cut, shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    chunk, batches = batch_size * bucket_batches, []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


@pytest.mark.parametrize("n, batch_size, bucket_batches", [(103, 4, 5), (64, 8, 2), (5, 8, 50), (1, 1, 1)])
def test_batch_plan_is_the_plainly_written_plan(n, batch_size, bucket_batches):
    lengths = np.random.default_rng(n).integers(10, 40, n)  # many ties: the order among equals counts too
    plan = bucketed_batches(lengths, batch_size, seed=3, epoch=2, bucket_batches=bucket_batches)
    batches = [plan[k] for k in range(len(plan))]
    assert batches == reference_batches(lengths.tolist(), batch_size, 3, 2, bucket_batches)
    assert sorted(i for b in batches for i in b) == list(range(n))
    other_epoch = bucketed_batches(lengths, batch_size, seed=3, epoch=3, bucket_batches=bucket_batches)
    assert n < 8 or [other_epoch[k] for k in range(len(other_epoch))] != batches
    kept = plan.keep(plan.sizes == batch_size)
    assert [kept[k] for k in range(len(kept))] == [b for b in batches if len(b) == batch_size]


def test_fewer_rows_than_processes_is_refused(tmp_path, setup):
    from speechllm.distributed import World
    from speechllm.model.builder import ModelSpec
    from speechllm.train import Trainer
    from speechllm.train_config import TrainConfig

    model, jsonl = setup
    one_row = tokenized(model, jsonl, tmp_path / "tokens", limit=1)
    with pytest.raises(InputError, match="1 training rows for 2 processes: every process needs at least one row"):
        Trainer(model, ModelSpec(llm={}, feat_dim=16), TrainConfig(batch_size=1), one_row, None, tmp_path,
                world=World(rank=0, size=2))
