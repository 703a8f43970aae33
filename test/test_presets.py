"""Every recipe's presets and training configs resolve: files exist, keys are known, budgets are set."""

import subprocess
from pathlib import Path

import pytest

from speechllm.config import load_yaml_dataclass
from speechllm.train_config import TrainConfig, accumulation_for

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.parent.parent for p in REPO.glob("egs/*/sf1/conf/preset"))
PRESETS = [(r, p.stem) for r in RECIPES for p in sorted((r / "conf" / "preset").glob("*.sh"))]


def preset_vars(recipe: Path, preset: str) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f". conf/preset/{preset}.sh && echo \"$train_config\" && echo \"$ngpu\""],
                         cwd=recipe, capture_output=True, text=True, check=True).stdout.splitlines()
    return {"train_config": out[0] or "conf/train.yaml", "ngpu": out[1] or "0"}


@pytest.mark.parametrize("recipe, preset", PRESETS, ids=[f"{r.parent.name}-{p}" for r, p in PRESETS])
def test_preset_points_at_a_valid_training_config(recipe, preset):
    values = preset_vars(recipe, preset)
    config = load_yaml_dataclass(recipe / values["train_config"], TrainConfig)
    if preset == "mini":  # CI-sized: a few epochs of a tiny corpus
        assert config.epochs <= 20 and config.max_steps is None
    elif values["ngpu"] == "0":  # a CPU preset bounds its training time
        assert config.max_minutes is not None


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.parent.name for r in RECIPES])
def test_default_training_fits_the_cpu_hour(recipe):
    config = load_yaml_dataclass(recipe / "conf" / "train.yaml", TrainConfig)
    assert config.max_minutes == 6 and config.align.steps == 0


def test_call_centre_offers_long_and_gpu_presets():
    recipe = REPO / "egs" / "callcenter" / "sf1"
    assert load_yaml_dataclass(recipe / preset_vars(recipe, "long")["train_config"], TrainConfig).max_minutes == 40
    gpu = preset_vars(recipe, "gpu")
    config = load_yaml_dataclass(recipe / gpu["train_config"], TrainConfig)
    assert gpu["ngpu"] == "1" and config.lr == 2e-4 and config.gradient_checkpointing
    assert config.max_minutes is None and config.epochs == 10
    # the paper's effective batch of 128 on any number of GPUs: 4 per GPU, the accumulation follows
    assert [accumulation_for(config, n) for n in (1, 2, 4, 8)] == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="effective_batch 128 is not a multiple of batch_size 4 x 3 processes"):
        accumulation_for(config, 3)
