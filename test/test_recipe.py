"""End to end: the call-centre recipe's mini preset runs stages 0-5 on CPU, and reruns are safe."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import kaldiio
import pytest
import yaml

from conftest import copy_recipe, run
from speechllm.metrics import score_corpus

MODES = {"regular": ["regular"], "reasoning": ["reasoning"], "hybrid": ["hybrid_no_think", "hybrid_think"],
         "cascade": ["cascade"]}


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
        whisper = (recipe / "conf" / "whisper" / "tiny_random.yaml").resolve()
        assert (recipe / "dump" / dset / "whisper").read_text() == f"{whisper}\n"  # stage 1's record
    for mode, decode_modes in MODES.items():
        exp = recipe / "exp" / f"tiny_llama_{mode}"
        assert (exp / "model" / "adapter.pt").exists() == (mode != "cascade")  # the cascade reads no audio
        assert (exp / "model" / "lora" / "adapter_config.json").exists()
        assert list((exp / "checkpoints").glob("step_*/state.pt"))
        assert (exp / "loss.png").exists() and list((exp / "tensorboard").iterdir())
        for name in decode_modes:
            ddir = exp / f"decode_test_{name}"
            hyps = (ddir / "hyp.jsonl").read_text().splitlines()
            n_refs = len((recipe / "data" / "test" / "wav.scp").read_text().splitlines())
            assert len(hyps) == n_refs
            scores = json.loads((ddir / "score" / "scores.json").read_text())
            # stage 5 scored this hyp.jsonl against this decode mode's stage-2 references: recomputed here
            refs = {r["id"]: r["slots"] for r in map(json.loads, (recipe / "dump" / "test" / f"{mode}.jsonl")
                                                     .read_text().splitlines()) if r["mode"] == name}
            hyp_rows = [json.loads(line) for line in hyps]
            assert sorted(r["id"] for r in hyp_rows) == sorted(refs)
            expected = score_corpus(refs, {r["id"]: (r["slots"], r["parseable"]) for r in hyp_rows})
            expected = json.loads(json.dumps(expected))  # as scores.json holds it
            for key in ("partial", "exact", "slu_f1", "span_f1", "per_slot", "n_utts", "n_missing",
                        "n_unparseable"):
                assert scores[key] == expected[key], (name, key)
            assert scores["n_truncated"] == sum(r["truncated"] for r in hyp_rows)
            assert scores["n_utts"] == n_refs and scores["n_missing"] == 0
            assert scores["run"] == {"llm": "tiny_llama", "mode": mode, "think": {"hybrid_think": True,
                                     "hybrid_no_think": False}.get(name), "tag": None, "set": "test",
                                     "whisper": str(whisper), "exp_dir": f"exp/tiny_llama_{mode}"}
    results = (recipe / "exp" / "RESULTS.md").read_text()
    assert "Table 1" in results and "hybrid_think" in results and "tiny_llama" in results
    assert "| tiny_llama | test | cascade |" in results and (recipe / "exp" / "RESULTS_f1.png").exists()


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
    scores = json.loads((recipe / "exp" / "tiny_llama_regular_again" / "decode_test_regular" / "score" /
                         "scores.json").read_text())
    n_refs = len((recipe / "data" / "test" / "wav.scp").read_text().splitlines())
    assert (scores["n_utts"], scores["n_missing"]) == (n_refs, 0)


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
             ("tiny_llama_hybrid", ["--no_think", "--slots", "new_limit,payment_amount"]), ("tiny_llama_cascade", [])]
    for exp, flags in cases:
        proc = subprocess.run([sys.executable, "-m", "speechllm.bin.infer", "--exp", str(recipe / "exp" / exp),
                               *flags, str(wav), str(wav)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
        assert len(lines) == 2 and lines[0] == lines[1]
        assert lines[0]["file"] == str(wav) and isinstance(lines[0]["slots"], dict)
        assert ("transcript" in lines[0]) == exp.endswith("cascade")
    proc = subprocess.run([sys.executable, "-m", "speechllm.bin.infer", "--exp",
                           str(recipe / "exp" / "tiny_llama_regular"), "--think", str(wav)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "regular mode" in proc.stderr


FIND_ALL = "<audio>\nFind all slot values in the current audio. Format the output as JSON."
FIND_TWO = "<audio>\nFind slot values for new_limit, payment_amount in the current audio. Format the output as JSON."


@pytest.mark.slow
@pytest.mark.parametrize("exp, flags, prompt", [
    ("tiny_llama_regular", [], FIND_ALL),
    ("tiny_llama_regular", ["--slots", " new_limit , payment_amount,"], FIND_TWO),
    ("tiny_llama_reasoning", ["--think", "--slots", "new_limit,payment_amount"], FIND_TWO),  # no switch to add
    ("tiny_llama_hybrid", [], FIND_ALL + " /no_think"),  # a hybrid model answers directly unless told
    ("tiny_llama_hybrid", ["--think"], FIND_ALL + " /think"),
    ("tiny_llama_hybrid", ["--no_think", "--slots", "new_limit,payment_amount"], FIND_TWO + " /no_think"),
    ("tiny_llama_cascade", ["--slots", "new_limit,payment_amount"], FIND_TWO),
], ids=["regular", "regular-slots", "reasoning-think-slots", "hybrid", "hybrid-think", "hybrid-no_think-slots",
        "cascade-slots"])
def test_infer_prompts_for_the_slots_given(recipe, tmp_path, monkeypatch, capsys, exp, flags, prompt):
    """--slots makes the prompt query those labels (stage 2's first no-context query template), without it
    the prompt asks for every slot; --think/--no_think add the hybrid switch. Each printed line is the
    parse of what the model generated for that prompt."""
    import soundfile as sf

    from speechllm.bin import infer
    from speechllm.corpus.synth import synthesize
    from speechllm.model.speechllm import SpeechLLM
    from speechllm.parsing import parse_slots, reasoning_part, response_part

    wav = tmp_path / "turn.wav"
    sf.write(wav, synthesize("I'd like to raise my credit limit to $5,000.", "en-us+f2", 160, 50), 16000)
    prompts, outputs = [], []
    tokenize, generate = SpeechLLM.tokenize, SpeechLLM.generate

    def recorded_tokenize(self, feats, text, target=None):
        prompts.append(text)
        return tokenize(self, feats, text, target)

    def recorded_generate(self, items, *args, **kwargs):
        out = generate(self, items, *args, **kwargs)
        outputs.extend(g.text for g in out)
        return out

    monkeypatch.setattr(SpeechLLM, "tokenize", recorded_tokenize)
    monkeypatch.setattr(SpeechLLM, "generate", recorded_generate)
    monkeypatch.setattr(infer, "setup_logging", lambda *args: None)
    with pytest.raises(SystemExit) as exit_status:
        infer.main(["--exp", str(recipe / "exp" / exp), *flags, "--device", "cpu", str(wav)])
    assert exit_status.value.code == 0
    (line,) = [json.loads(out) for out in capsys.readouterr().out.strip().splitlines()]
    if exp.endswith("cascade"):  # the transcript stands where the audio would
        prompt = prompt.replace("<audio>", f'(transcript) "{line["transcript"]}"')
    assert prompts == [prompt]
    (output,) = outputs
    parsed = parse_slots(output)
    assert (line["file"], line["slots"], line["parseable"]) == (str(wav), parsed.slots, parsed.parseable)
    assert line.get("reasoning") == reasoning_part(output)  # the trace, as the output wrote it
    assert line.get("output") == (None if parsed.parseable else response_part(output))


def short_training(recipe: Path) -> str:
    """A 10-step train config for the runs that only check plumbing."""
    cfg = yaml.safe_load((recipe / "conf" / "train_mini.yaml").read_text())
    (recipe / "conf" / "train_short.yaml").write_text(yaml.safe_dump({**cfg, "max_steps": 10}))
    return "conf/train_short.yaml"


SHORT_DECODE = ("--max_new_tokens", "48")


@pytest.mark.slow
def test_grid_fills_the_paper_tables_from_every_run(recipe):
    proc = subprocess.run(["local/run_grid.sh", "--llms", "tiny_llama tiny_qwen3", "--preset", "mini",
                           "--train_config", short_training(recipe), "--results_md", "exp/GRID.md", *SHORT_DECODE],
                          cwd=recipe, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the mini preset's tiny_llama runs are reused, the Qwen3-family model is trained in every mode
    assert "grid: tiny_llama regular already scored" in proc.stdout + proc.stderr
    assert (recipe / "exp" / "tiny_qwen3_cascade" / "model" / "speechllm.yaml").exists()
    assert not (recipe / "exp" / "tiny_qwen3_cascade" / "model" / "adapter.pt").exists()  # text only

    grid = (recipe / "exp" / "GRID.md").read_text()
    sections = grid.split("\n## ")
    table1, table2, cascade, scores = (next(s for s in sections if s.startswith(t)) for t in
                                       ("Table 1", "Table 2", "Cascade baseline", "All scores"))
    for llm in ("tiny_llama", "tiny_qwen3"):
        assert f"| {llm} | test |" in table1 and f"| {llm} | test |" in cascade
        assert table2.count(f"| {llm} | test |") == 2
        for mode in ("regular", "reasoning", "hybrid_no_think", "hybrid_think", "cascade"):
            exp = f"{llm}_{mode.split('_')[0]}"
            s = json.loads((recipe / "exp" / exp / f"decode_test_{mode}" / "score" / "scores.json").read_text())
            p = s["partial"]
            row = (f"| {llm} | test | {mode} | {p['precision']:.4f} / {p['recall']:.4f} / {p['f1']:.4f} | ")
            assert row in scores, row
            assert f"| {s['n_utts']} | {s['n_unparseable']} | {s['n_missing']} |" in scores
    assert (recipe / "exp" / "GRID_f1.png").read_bytes()[:4] == b"\x89PNG"
    assert "](GRID_f1.png)" in grid


@pytest.mark.slow
def test_adding_a_foundation_model_as_the_readme_says(recipe):
    # README, "Adding a foundation model": copy the closest config, change what differs. Here a tiny
    # random Phi-3-family model (the architecture of Phi-4-mini-reasoning) built from its config class.
    cfg = yaml.safe_load((recipe / "conf" / "llm" / "tiny_llama.yaml").read_text())
    cfg["tiny"] = {**cfg["tiny"], "model_type": "phi3", "original_max_position_embeddings": 2048}
    cfg["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (recipe / "conf" / "llm" / "tiny_phi3.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for mode in ("regular", "hybrid"):
        proc = run(recipe, "--preset", "mini", "--stage", "3", "--llm", "tiny_phi3", "--mode", mode,
                   "--train_config", short_training(recipe), "--results_md", f"exp/phi3_{mode}.md", *SHORT_DECODE)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = json.loads((recipe / "exp" / "tiny_phi3_regular" / "base_llm" / "config.json").read_text())
    assert base["architectures"] == ["Phi3ForCausalLM"]
    for mode in ("regular", "hybrid_no_think", "hybrid_think"):
        exp = "tiny_phi3_" + mode.split("_")[0]
        scores = json.loads((recipe / "exp" / exp / f"decode_test_{mode}" / "score" / "scores.json").read_text())
        n_refs = len((recipe / "data" / "test" / "wav.scp").read_text().splitlines())
        assert (scores["n_utts"], scores["n_missing"]) == (n_refs, 0)


def test_stage5_names_each_run_and_keeps_the_recipe_results(tmp_path):
    """Stage 5 alone on hand-made stage-2 files and hypotheses: scores.json holds the run's identity, and
    the tables go to exp/RESULTS.md, not to the recipe's committed RESULTS.md."""
    from test_results import write_stage2

    recipe = copy_recipe(tmp_path)
    committed = [(recipe / name).read_bytes() for name in ("RESULTS.md", "RESULTS_f1.png")]
    write_stage2(recipe / "dump" / "test", "hybrid")
    (recipe / "dump" / "test" / "whisper").write_text("/models/whisper/base.pt\n")  # stage 1's record
    rows = [json.loads(line) for line in (recipe / "dump" / "test" / "hybrid.jsonl").read_text().splitlines()]
    for name in ("hybrid_no_think", "hybrid_think"):
        ddir = recipe / "exp" / "tiny_llama_hybrid_t1" / f"decode_test_{name}"
        ddir.mkdir(parents=True)
        (ddir / "hyp.jsonl").write_text("".join(json.dumps({"id": r["id"], "slots": r["slots"]}) + "\n"
                                                for r in rows if r["mode"] == name))
    (recipe / "data" / "train").mkdir(parents=True)
    (recipe / "data" / "train" / "text").write_text("t1 I paid 30 dollars\n")  # what the novel turns are novel to
    proc = run(recipe, "--stage", "5", "--llm", "tiny_llama", "--mode", "hybrid", "--tag", "t1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, think in (("hybrid_no_think", False), ("hybrid_think", True)):
        scores = recipe / "exp" / "tiny_llama_hybrid_t1" / f"decode_test_{name}" / "score" / "scores.json"
        assert json.loads(scores.read_text())["run"] == {
            "llm": "tiny_llama", "mode": "hybrid", "think": think, "tag": "t1", "set": "test",
            "whisper": "/models/whisper/base.pt", "exp_dir": "exp/tiny_llama_hybrid_t1"}
    results = (recipe / "exp" / "RESULTS.md").read_text()
    assert "| tiny_llama_t1 | test | hybrid_think | 1.0000 / 1.0000 / 1.0000 |" in results
    assert (recipe / "exp" / "RESULTS_f1.png").exists()
    assert [(recipe / name).read_bytes() for name in ("RESULTS.md", "RESULTS_f1.png")] == committed

    proc = run(recipe, "--stage", "5", "--mode", "regular,hybird")
    assert proc.returncode != 0
    assert "unknown mode 'hybird': regular, reasoning, hybrid, cascade or all" in proc.stderr
    proc = run(recipe, "--help")
    for option in ('train_args=""', 'llm_args=""', "force_config=false", "results_md=exp/RESULTS.md"):
        assert option in proc.stderr, option


FAKE_RUN = f"""#!{sys.executable}
# Stands in for run.sh under local/run_grid.sh: records its arguments and scores a made-up run the way
# sf.sh's stage 5 names it, in a dir named nothing like exp/<llm>_<mode>.
import argparse, json, sys
from pathlib import Path
from speechllm.formatting import DECODES
with open("run_calls.txt", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
parser = argparse.ArgumentParser()
for name in ("--llm", "--mode", "--tag", "--results_md"):
    parser.add_argument(name)
args, _ = parser.parse_known_args()
n = len(list(Path("exp").glob("run*")))
for name, (mode, think) in DECODES.items():
    if mode != args.mode:
        continue
    prf = {{"precision": 0.5, "recall": 0.5, "f1": 0.5}}
    score = Path("exp", f"run{{n}}", f"d_{{name}}", "score")
    score.mkdir(parents=True)
    (score / "scores.json").write_text(json.dumps({{
        "run": {{"llm": args.llm, "mode": args.mode, "think": think, "tag": args.tag or None, "set": "test",
                "whisper": "base", "exp_dir": f"exp/run{{n}}"}},
        "partial": prf, "exact": prf, "slu_f1": prf, "n_utts": 2, "n_unparseable": 0, "n_missing": 0}}))
"""


def test_grid_keeps_its_tag_and_finds_runs_by_their_identity(tmp_path):
    recipe = copy_recipe(tmp_path)
    (recipe / "run.sh").unlink()
    (recipe / "run.sh").write_text(FAKE_RUN)
    (recipe / "run.sh").chmod(0o755)
    subprocess.run(["./run.sh", "--llm", "tiny_llama", "--mode", "regular", "--tag", ""], cwd=recipe, check=True)
    (recipe / "run_calls.txt").unlink()  # an untagged run from before: not the grid's tagged one

    grid = ["local/run_grid.sh", "--llms", "tiny_llama", "--modes", "regular hybrid", "--preset", "mini",
            "--results_md", "exp/GRID.md"]
    proc = subprocess.run([*grid, "--tag", "lr1e-3"], cwd=recipe, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = (recipe / "run_calls.txt").read_text().splitlines()
    assert calls == [f"--preset mini --stage 3 --stop_stage 5 --llm tiny_llama --mode {mode} --tag lr1e-3 "
                     f"--results_md exp/GRID_runs/tiny_llama_{mode}_lr1e-3.md" for mode in ("regular", "hybrid")]
    table = (recipe / "exp" / "GRID.md").read_text()
    for mode in ("regular", "hybrid_no_think", "hybrid_think"):
        assert f"| tiny_llama_lr1e-3 | test | {mode} | 0.5000 / 0.5000 / 0.5000 |" in table
    assert "| tiny_llama | test |" not in table  # the untagged run is another system
    assert "--tag lr1e-3" in table and (recipe / "exp" / "GRID_f1.png").exists()

    proc = subprocess.run([*grid, "--tag=lr1e-3"], cwd=recipe, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len((recipe / "run_calls.txt").read_text().splitlines()) == 2  # nothing trained again
    assert "grid: tiny_llama hybrid lr1e-3 already scored in exp/run2 " in proc.stdout + proc.stderr


BENCH_KEYS = {
    "machine": ["device", "threads", "cpus", "cpu_model", "torch", "dtype", "matmul_gflops"],
    "stage1": ["whisper", "n_utts", "audio_s", "encoder_true_length", "encoder_30s", "shared_frames", "asr_per_turn",
               "asr_packed", "wer_change"],
    "training": ["tokens_per_s", "examples_per_s", "padding_efficiency", "flops_per_token", "achieved_gflops",
                 "roofline_fraction", "mean_tokens_per_example", "steps", "batch_size", "seconds"],
    "decoding": ["n_utts", "max_new_tokens", "batch_1", "batched", "speedup", "identical_outputs", "identical_share"],
    "memory": ["lora", "qlora"],
    "startup": ["sizes"],
}


@pytest.mark.slow
def test_bench_on_the_mini_preset_writes_every_key(recipe):
    """local/bench.sh measures every section on the recipe's own data and trained model; no speed is
    asserted, only that each number is there and agrees with what was measured."""
    proc = subprocess.run(["local/bench.sh", "--preset", "mini", "--utts", "4", "--train_steps", "2",
                           "--startup_rows", "300"], cwd=recipe, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    bench = json.loads((recipe / "exp" / "bench" / "bench.json").read_text())
    for section, keys in BENCH_KEYS.items():
        assert [k for k in [*keys, "measured", "commit", "command"] if bench[section].get(k) is None] == [], section
    assert bench["machine"]["matmul_gflops"] > 0
    assert bench["stage1"]["n_utts"] == 4 and bench["stage1"]["audio_s"] > 0
    for path in ("encoder_true_length", "encoder_30s", "asr_per_turn", "asr_packed"):
        assert set(bench["stage1"][path]) >= {"s_per_utt", "rtf"}, path
    assert {"wer", "fallbacks"} <= set(bench["stage1"]["asr_packed"])
    assert 0 < bench["training"]["padding_efficiency"] <= 1 and bench["training"]["steps"] == 2
    decoding = bench["decoding"]
    assert decoding["n_utts"] == 4 and decoding["identical_outputs"] == 4  # batching changes no output
    assert [sum(decoding[b]["stops"].values()) for b in ("batch_1", "batched")] == [4, 4]
    for variant in ("lora", "qlora"):
        assert bench["memory"][variant].get("peak_rss_mb", 0) > 0, bench["memory"][variant]
    assert [s["rows"] for s in bench["startup"]["sizes"]] == [300]
    table = (recipe / "exp" / "bench" / "bench.md").read_text()
    assert "| training: padding efficiency | >= 0.9 |" in table and "| decoding, batch 8 |" in table
