"""End to end: stage 1 speaks and encodes the alignment corpus once, and stage 3 aligns once for every
mode, on the training turns and the corpus, measured on dev and test."""

import json

import pytest

from conftest import copy_recipe, run

ALIGN = ("--preset", "mini", "--align_calls", "3", "--mode", "regular,hybrid", "--tag", "al")
STEPS = "max_steps=2 align.steps=4 align.eval_every=2 align.batch_size=4"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    recipe = copy_recipe(tmp_path_factory.mktemp("repo"))
    proc = run(recipe, *ALIGN, "--stop_stage", "3", "--train_args", STEPS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return recipe


@pytest.mark.slow
def test_stage1_makes_the_corpus_beside_the_recipes(recipe):
    corpus = recipe.parent.parent / "align_dump" / "tiny_random" / "seed1"
    calls = [json.loads(line) for line in (corpus / "text" / "conversations.jsonl").read_text().splitlines()]
    n_turns = sum(len(c["turns"]) for c in calls)
    assert len(calls) == 3 and n_turns > 10
    assert len((corpus / "dump" / "feats.scp").read_text().splitlines()) == n_turns
    whisper = (recipe / "conf" / "whisper" / "tiny_random.yaml").resolve()
    assert (corpus / "dump" / "whisper").read_text() == f"{whisper}\n"
    assert len(list((corpus / "wav").glob("*.wav"))) == n_turns


@pytest.mark.slow
def test_every_mode_shares_one_alignment_measured_on_dev_and_test(recipe):
    align = recipe / "exp" / "tiny_llama_align_al"
    for name in ("adapter.pt", "ctc_head.pt", "align.json", "align_log.jsonl", "align_curve.png",
                 "valid_hyp_step4.tsv", "test_hyp_step4.tsv"):
        assert (align / name).exists(), name
    record = json.loads((align / "align.json").read_text())
    corpus = recipe.parent.parent / "align_dump" / "tiny_random" / "seed1"
    n_train = len((recipe / "data" / "train" / "text").read_text().splitlines())
    n_corpus = len((corpus / "dump" / "feats.scp").read_text().splitlines())
    assert n_train < record["turns"] <= n_train + n_corpus and record["corpus"] == str(corpus.resolve())
    history = [json.loads(line) for line in (align / "align_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [2, 4]
    n_test = len((recipe / "data" / "test" / "text").read_text().splitlines())
    assert len((align / "test_hyp_step4.tsv").read_text().splitlines()) == n_test
    assert {"valid_wer", "valid_values_heard", "test_wer", "test_novel_values"} <= set(history[-1])
    logs = [(recipe / "exp" / f"tiny_llama_{m}_al" / "train.log").read_text() for m in ("regular", "hybrid")]
    assert "CTC over" in logs[0] and "reusing" not in logs[0]
    assert "CTC over" not in logs[1] and f"reusing {align.relative_to(recipe)}" in logs[1]
    assert all("alignment phase done" in log for log in logs)


@pytest.mark.slow
def test_an_alignment_made_otherwise_is_refused(recipe):
    """A mode not trained yet, with another alignment setting, into the same tag's alignment dir."""
    args = [a if a != "regular,hybrid" else "reasoning" for a in ALIGN]
    proc = run(recipe, *args, "--stage", "3", "--stop_stage", "3", "--train_args", STEPS + " align.lr=0.01")
    assert proc.returncode != 0
    log = (recipe / "exp" / "tiny_llama_reasoning_al" / "train.log").read_text()
    assert "tiny_llama_align_al was aligned with other settings (align differ)" in log
