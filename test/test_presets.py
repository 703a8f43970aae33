"""Every recipe's presets and training configs resolve: files exist, keys are known, budgets are set,
and each preset holds what docs/recipes.md says it does."""

import re
import subprocess
from pathlib import Path

import pytest

from speechllm.config import load_yaml_dataclass
from speechllm.train_config import TrainConfig, accumulation_for

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.parent.parent for p in REPO.glob("egs/*/sf1/conf/preset"))
PRESETS = [(r, p.stem) for r in RECIPES for p in sorted((r / "conf" / "preset").glob("*.sh"))]
SF_OPTIONS = re.findall(r"^([a-z_]+)=", re.search(r"^# General$(.*?)^results_md=", (REPO / "egs" / "TEMPLATE" / "sf1" /
                        "sf.sh").read_text(), re.M | re.S)[1], re.M) + ["results_md"]


def preset_vars(recipe: Path, preset: str) -> dict[str, str]:
    """Every option of sf.sh as sf.sh sees it with ``--preset preset`` and no other flag: its defaults,
    then the preset sourced over them."""
    script = ("eval \"$(sed -n '/^# General$/,/^results_md=/p' sf.sh)\"\n"
              f". conf/preset/{preset}.sh\n"
              + "".join(f"printf '%s\\0' \"${name}\"\n" for name in SF_OPTIONS))
    out = subprocess.run(["bash", "-c", script], cwd=recipe, capture_output=True, text=True, check=True).stdout
    return dict(zip(SF_OPTIONS, out.split("\0")[:-1], strict=True))


def assigned(recipe: Path, script: Path) -> set[str]:
    """The variables a preset sets, those of the presets it sources included."""
    names = set()
    for line in script.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"\. (\S+)", line):
            names |= assigned(recipe, recipe / match[1])
        elif match := re.match(r"([A-Za-z_]\w*)=", line):
            names.add(match[1])
    return names


@pytest.mark.parametrize("recipe, preset", PRESETS, ids=[f"{r.parent.name}-{p}" for r, p in PRESETS])
def test_presets_set_only_options_of_sf_sh(recipe, preset):
    # a misspelt name would be set, never read, and the run would go on with the default
    assert {"stage", "local_data_opts", "whisper", "feats_dtype", "llm", "train_config", "ngpu", "results_md"} <= \
        set(SF_OPTIONS)
    names = assigned(recipe, recipe / "conf" / "preset" / f"{preset}.sh")
    assert names and names <= set(SF_OPTIONS), sorted(names - set(SF_OPTIONS))


@pytest.mark.parametrize("recipe, preset", PRESETS, ids=[f"{r.parent.name}-{p}" for r, p in PRESETS])
def test_preset_points_at_a_valid_training_config(recipe, preset):
    values = preset_vars(recipe, preset)
    config = load_yaml_dataclass(recipe / values["train_config"], TrainConfig)
    if preset == "mini":  # CI-sized: a few epochs of a tiny corpus, random tiny models
        assert config.epochs <= 20 and config.max_steps is None
        assert (values["whisper"], values["llm"], values["ngpu"]) == ("conf/whisper/tiny_random.yaml", "tiny_llama", "0")
        assert (recipe / values["whisper"]).is_file() and (recipe / "conf" / "llm" / "tiny_llama.yaml").is_file()
    elif values["ngpu"] == "0":  # a CPU preset bounds its training time
        assert config.max_minutes is not None


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.parent.name for r in RECIPES])
def test_default_training_fits_the_cpu_hour(recipe):
    config = load_yaml_dataclass(recipe / "conf" / "train.yaml", TrainConfig)
    assert config.max_minutes == 6 and config.align.steps <= 2400  # per mode; one alignment per run


def test_call_centre_default_aligns_on_the_corpus_and_reads_hard_tokens():
    recipe = REPO / "egs" / "callcenter" / "sf1"
    config = load_yaml_dataclass(recipe / "conf" / "train.yaml", TrainConfig)
    assert config.align.steps > 0 and config.audio_input == "ctc_tokens"
    # what measured best (docs/experiments/2026-12-01-text-first-and-hard-tokens.md): hard tokens, no curriculum
    assert config.ctc_collapse == "hard" and config.text_first == 0 and config.ctc_weight == 0
    # and the alignment's rate decays (docs/experiments/2026-12-01-cosine-alignment.md)
    assert config.align.schedule == "cosine" and config.align.warmup_ratio > 0
    script = "eval \"$(sed -n '/^# General$/,/^results_md=/p' sf.sh)\"; echo ${align_calls}"
    calls = subprocess.run(["bash", "-c", script], cwd=recipe, capture_output=True, text=True, check=True).stdout
    assert int(calls) >= 800


def test_call_centre_long_preset():
    recipe = REPO / "egs" / "callcenter" / "sf1"
    values = preset_vars(recipe, "long")
    assert values["local_data_opts"] == "--num_calls 150 --num_dev 6 --num_test 15" and values["ngpu"] == "0"
    config = load_yaml_dataclass(recipe / values["train_config"], TrainConfig)
    assert config.max_minutes == 40 and config.eval_every == 40  # 40 minutes per mode, dev curves every 40 steps
    assert config.align.steps > 0 and config.audio_input == "ctc_tokens"  # the CTC alignment phase


def test_call_centre_gpu_preset_holds_the_papers_settings():
    recipe = REPO / "egs" / "callcenter" / "sf1"
    values = preset_vars(recipe, "gpu")
    # 300 calls (20 dev, 30 test), float16 features, one GPU by default (stages 1 and 4: one per job);
    # the default models
    assert values["local_data_opts"] == "--num_calls 300 --num_dev 20 --num_test 30"
    assert (values["ngpu"], values["feats_dtype"]) == ("1", "float16")
    assert (values["whisper"], values["llm"]) == ("base", "smollm2_135m")
    assert values["train_config"] == "conf/train_gpu.yaml"
    config = load_yaml_dataclass(recipe / values["train_config"], TrainConfig)
    # the paper (§3.1): AdamW at peak lr 2e-4, 20% linear warm-up then cosine, 10 epochs, clipping 1.0,
    # 4 per GPU and an effective batch of 128; with gradient checkpointing, no time budget, no alignment
    assert (config.lr, config.adapter_lr, config.warmup_ratio, config.grad_clip) == (2e-4, None, 0.2, 1.0)
    assert (config.epochs, config.max_steps, config.max_minutes) == (10, None, None)
    assert (config.batch_size, config.effective_batch) == (4, 128)
    assert config.gradient_checkpointing and config.align.steps == 0 and config.audio_input == "adapter"
    assert (config.adapter_hidden, config.stack) == (2048, 4)
    # the accumulation follows the number of GPUs so that 4 x GPUs x accumulation stays 128
    for gpus, accumulation in ((1, 32), (2, 16), (4, 8), (8, 4)):
        assert accumulation_for(config, gpus) == accumulation and 4 * gpus * accumulation == 128
    with pytest.raises(ValueError, match="effective_batch 128 is not a multiple of batch_size 4 x 3 processes"):
        accumulation_for(config, 3)
