"""The options of ``sf.sh`` (through a recipe copy's ``run.sh``): a bad option, preset, mode or an ASR-less
cascade stops the run before any stage with a message that says why; an explicit flag beats its preset's
value, whatever their order; ``--llm_path`` reaches training as the LLM config's ``name_or_path``."""

import pytest
import yaml

from conftest import copy_recipe, run


@pytest.fixture
def recipe(tmp_path):
    """A fresh recipe copy for each test: a refused run must leave it without data/, dump/ or exp/."""
    return copy_recipe(tmp_path)


def assert_refused_before_any_stage(recipe, proc, message):
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Stage " not in proc.stdout + proc.stderr  # no stage started
    for name in ("data", "dump", "exp"):
        assert not (recipe / name).exists(), name


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus", "1"], "./sf.sh: unknown option --bogus (see --help)"),
    (["--stage", "0", "--num-calls=10"], "./sf.sh: unknown option --num_calls (see --help)"),
    (["--preset", "nope"], "Error: unknown preset 'nope'. Available: gpu long mini"),
    (["--nj", "1", "--preset=nope"], "Error: unknown preset 'nope'. Available: gpu long mini"),
    (["--mode", "foo"], "Error: unknown mode 'foo': regular, reasoning, hybrid, cascade or all"),
    (["--asr", "false"], "Error: the cascade (--mode cascade or all) needs Whisper's transcripts: --asr true"),
    (["--mode", "cascade", "--asr", "false"],
     "Error: the cascade (--mode cascade or all) needs Whisper's transcripts: --asr true"),
], ids=["unknown option", "unknown option, --name=value", "unknown preset", "unknown preset, --preset=name",
        "unknown mode", "all modes without ASR", "cascade without ASR"])
def test_bad_options_stop_before_any_stage(recipe, args, message):
    # --stop_stage 0: were a check missing, the run would go no further than stage 0's seconds
    assert_refused_before_any_stage(recipe, run(recipe, *args, "--stop_stage", "0"), message)


def test_end_to_end_modes_without_asr_are_accepted(recipe):
    proc = run(recipe, "--mode", "regular", "--asr", "false", "--stage", "6")  # stage 6: none to run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Successfully finished." in proc.stdout and "Stage " not in proc.stdout


@pytest.mark.parametrize(("args", "llm"), [
    ([], "smollm2_135m"),  # sf.sh's default
    (["--preset", "mini"], "tiny_llama"),  # the preset's value
    (["--preset", "mini", "--llm", "smollm2_135m"], "smollm2_135m"),  # the flag's, given after the preset
    (["--llm", "smollm2_135m", "--preset", "mini"], "smollm2_135m"),  # or before it
    (["--llm=smollm2_135m", "--preset=mini"], "smollm2_135m"),
], ids=["default", "preset", "flag after preset", "flag before preset", "--name=value forms"])
def test_an_explicit_flag_beats_the_preset(recipe, args, llm):
    # stage 4 alone with no trained model stops at once, naming the experiment dir, which holds the resolved --llm
    proc = run(recipe, *args, "--stage", "4", "--stop_stage", "4", "--mode", "regular")
    assert proc.returncode != 0
    assert f"Error: exp/{llm}_regular/model missing: run stage 3 first" in proc.stdout, proc.stdout + proc.stderr


def test_a_flag_beats_the_preset_for_the_train_config_too(recipe):
    proc = run(recipe, "--preset", "mini", "--train_config", "conf/missing.yaml", "--stage", "6")
    assert_refused_before_any_stage(recipe, proc, "Error: --train_config conf/missing.yaml not found")


def test_llm_path_reaches_training_as_name_or_path(recipe):
    # stage 3 without stage 2's files: bin/train.py records the resolved LLM config, then stops (no data)
    path = "/models/my copy/SmolLM2-135M-Instruct"  # a space: the path must survive every shell it goes through
    proc = run(recipe, "--stage", "3", "--stop_stage", "3", "--mode", "regular", "--llm_path", path,
               "--llm_args", "lora.r=8")
    assert proc.returncode != 0
    exp = recipe / "exp" / "smollm2_135m_regular"
    assert "dump/train/regular.jsonl not found (stage 2 writes it)" in (exp / "train.log").read_text()
    config = yaml.safe_load((recipe / "conf" / "llm" / "smollm2_135m.yaml").read_text())
    resolved = yaml.safe_load((exp / "llm.yaml").read_text())
    assert resolved["name_or_path"] == path and resolved["local_cache"] is None  # the path, not the offline copy
    assert resolved["lora"] == {**config["lora"], "r": 8}  # --llm_args still applies beside it
    assert {k: resolved[k] for k in ("prompt_style", "system_prompt", "dtype")} == \
        {k: config[k] for k in ("prompt_style", "system_prompt", "dtype")}
