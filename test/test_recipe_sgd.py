"""End to end: the SGD recipe's mini preset runs stages 0-5 on the shared SGD subset, on CPU.

Only the hybrid mode is trained (it decodes both with and without reasoning): the call-centre
recipe's test covers every mode, this one the SGD reader, the per-service data and the group scores.
"""

import json

import pytest

from conftest import copy_recipe, run, sgd_root

DECODES = ("hybrid_no_think", "hybrid_think")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    recipe = copy_recipe(tmp_path_factory.mktemp("repo"), "sgd")
    proc = run(recipe, "--preset", "mini", "--mode", "hybrid", "--sgd_root", str(sgd_root()))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return recipe


@pytest.mark.slow
def test_mini_preset_scores_seen_and_unseen_services(recipe):
    for dset in ("train", "valid", "dev"):
        assert (recipe / "data" / dset / "slots.jsonl").stat().st_size > 0
        assert (recipe / "dump" / dset / "feats.scp").stat().st_size > 0
    groups = dict(line.split() for line in (recipe / "data" / "dev" / "utt2group").read_text().splitlines())
    assert set(groups.values()) == {"seen", "unseen"}
    assert set((recipe / "data" / "train" / "utt2group").read_text().split()[1::2]) == {"seen"}
    for name in DECODES:
        ddir = recipe / "exp" / "tiny_llama_hybrid" / f"decode_dev_{name}"
        scores = json.loads((ddir / "score" / "scores.json").read_text())
        assert scores["n_utts"] == len(groups) and scores["n_missing"] == 0
        by_group = scores["groups"]
        assert set(by_group) == {"seen", "unseen"}
        assert by_group["seen"]["n_utts"] + by_group["unseen"]["n_utts"] == len(groups)
        assert by_group["unseen"]["n_utts"] == sum(g == "unseen" for g in groups.values())
        for metric in ("partial", "exact"):  # the groups' counts add up to the overall counts
            for count in ("tp", "fp", "fn"):
                assert by_group["seen"][metric][count] + by_group["unseen"][metric][count] == scores[metric][count]
    results = (recipe / "exp" / "RESULTS.md").read_text()
    assert "## By group: seen, unseen" in results
    assert results.count("| tiny_llama | dev |") >= 2 * len(DECODES)  # all-scores and group rows
    assert (recipe / "exp" / "RESULTS_f1.png").stat().st_size > 0


@pytest.mark.slow
def test_a_missing_corpus_is_named(recipe, tmp_path):
    proc = run(recipe, "--stop_stage", "0", "--sgd_root", str(tmp_path / "nowhere"))
    assert proc.returncode != 0
    assert f"{tmp_path / 'nowhere' / 'train' / 'schema.json'}: no such file" in proc.stdout + proc.stderr
