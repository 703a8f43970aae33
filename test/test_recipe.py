"""End to end: the call-centre recipe's mini preset runs stages 0-5 on CPU, and reruns are safe."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import kaldiio
import pytest

from conftest import copy_recipe, run

MODES = {"regular": ["regular"], "reasoning": ["reasoning"], "hybrid": ["hybrid_no_think", "hybrid_think"]}


def sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    recipe = copy_recipe(tmp_path_factory.mktemp("repo"))
    proc = run(recipe, "--preset", "mini")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return recipe


@pytest.mark.slow
def test_mini_preset_produces_every_stage_output(recipe, monkeypatch):
    monkeypatch.chdir(recipe)  # scp files hold recipe-relative ark paths, as in ESPnet
    for dset in ("train", "dev", "test"):
        data = recipe / "data" / dset
        for name in ("wav.scp", "text", "utt2spk", "utt2conv", "utt2turn", "slots.jsonl"):
            assert (data / name).stat().st_size > 0, data / name
        feats = dict(kaldiio.load_scp(str(recipe / "dump" / dset / "feats.scp")))
        assert len(feats) == len((data / "wav.scp").read_text().splitlines())
        assert next(iter(feats.values())).shape[1] == 64  # the tiny encoder's width
        for mode in MODES:
            assert (recipe / "dump" / dset / f"{mode}.jsonl").stat().st_size > 0
    for mode, decode_modes in MODES.items():
        exp = recipe / "exp" / f"tiny_llama_{mode}"
        assert (exp / "model" / "adapter.pt").exists()
        assert (exp / "model" / "lora" / "adapter_config.json").exists()
        assert list((exp / "checkpoints").glob("step_*/state.pt"))
        assert (exp / "loss.png").exists() and list((exp / "tensorboard").iterdir())
        for name in decode_modes:
            ddir = exp / f"decode_test_{name}"
            hyps = (ddir / "hyp.jsonl").read_text().splitlines()
            n_refs = len((recipe / "data" / "test" / "wav.scp").read_text().splitlines())
            assert len(hyps) == n_refs
            scores = json.loads((ddir / "score" / "scores.json").read_text())
            for metric in ("partial", "exact", "slu_f1"):
                assert set(scores[metric]) >= {"precision", "recall", "f1"}
                assert 0.0 <= scores[metric]["f1"] <= 1.0
            assert scores["n_utts"] == n_refs and scores["n_missing"] == 0
            assert "per_slot" in scores and "n_unparseable" in scores
    results = (recipe / "exp" / "RESULTS.md").read_text()
    assert "Table 1" in results and "hybrid_think" in results and "tiny_llama" in results


@pytest.mark.slow
def test_rerunning_stages_is_safe(recipe):
    jsonl = recipe / "dump" / "train" / "regular.jsonl"
    before = sha(jsonl)
    proc = run(recipe, "--preset", "mini", "--stage", "2", "--stop_stage", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sha(jsonl) == before  # stage 2 is seeded: rerunning rewrites the same bytes

    untouched = {p: p.stat().st_mtime_ns for p in [jsonl, recipe / "dump/train/feats.scp",
                                                    recipe / "data/train/wav.scp"]}
    proc = run(recipe, "--preset", "mini", "--stage", "3", "--mode", "regular", "--tag", "again")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    scores = recipe / "exp" / "tiny_llama_regular_again" / "decode_test_regular" / "score" / "scores.json"
    assert json.loads(scores.read_text())["n_utts"] > 0


@pytest.mark.slow
def test_unknown_llm_fails_with_the_list_of_names(recipe):
    proc = run(recipe, "--preset", "mini", "--stage", "3", "--llm", "nonexistent")
    assert proc.returncode != 0
    assert "unknown --llm 'nonexistent'" in proc.stdout + proc.stderr
    assert "tiny_llama" in proc.stdout + proc.stderr and "smollm2_135m" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_infer_prints_one_json_line_per_wav(recipe, tmp_path):
    import soundfile as sf

    from speechllm.corpus.synth import synthesize

    wav = tmp_path / "turn.wav"
    sf.write(wav, synthesize("I'd like to raise my credit limit to $5,000.", "en-us+f2", 160, 50), 16000)
    cases = [("tiny_llama_regular", []), ("tiny_llama_hybrid", ["--think"]),
             ("tiny_llama_hybrid", ["--no_think", "--slots", "new_limit,payment_amount"])]
    for exp, flags in cases:
        proc = subprocess.run([sys.executable, "-m", "speechllm.bin.infer", "--exp", str(recipe / "exp" / exp),
                               *flags, str(wav), str(wav)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
        assert len(lines) == 2 and lines[0] == lines[1]
        assert lines[0]["file"] == str(wav) and isinstance(lines[0]["slots"], dict)
    proc = subprocess.run([sys.executable, "-m", "speechllm.bin.infer", "--exp",
                           str(recipe / "exp" / "tiny_llama_regular"), "--think", str(wav)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "regular mode" in proc.stderr
