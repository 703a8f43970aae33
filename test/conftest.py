"""Shared fixtures: tiny models built from configs and small feature sets written with kaldiio."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import torch

from speechllm.model.builder import ModelSpec, build_speechllm
from speechllm.model.llm import LLMConfig, build_tiny

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "egs" / "callcenter" / "sf1"

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
              "tie_word_embeddings": True, "initializer_range": 0.3}


def tiny_llm_dict(**overrides) -> dict:
    cfg = {"tiny": dict(TINY_LLAMA), "tiny_vocab_size": 400, "prompt_style": "chat"}
    cfg.update(overrides)
    return cfg


def make_tiny_speechllm(tmp_path: Path, texts: list[str], feat_dim: int = 16, llm: dict | None = None,
                        adapter_hidden: int = 32):
    llm = llm or tiny_llm_dict()
    base = build_tiny(LLMConfig(**llm), texts, tmp_path / "base_llm")
    spec = ModelSpec(llm=llm, feat_dim=feat_dim, adapter_hidden=adapter_hidden, stack=4)
    return build_speechllm(spec, base), spec, base


def write_examples(tmp_path: Path, rows: list[dict], feat_dim: int = 16, seed: int = 0) -> Path:
    """Write random features for each row into an ark and the rows (with ``feats``) into a JSONL file."""
    rng = np.random.default_rng(seed)
    ark, scp = tmp_path / "feats.ark", tmp_path / "feats.scp"
    with kaldiio.WriteHelper(f"ark,scp:{ark},{scp}") as writer:
        for row in rows:
            writer(row["utt_id"], rng.standard_normal((row.pop("n_frames_to_make", 40), feat_dim)).astype(np.float32))
    locations = dict(line.split(" ", 1) for line in scp.read_text().splitlines())
    path = tmp_path / "examples.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            row = {"id": row["utt_id"], "mode": "regular", "text": "", **row, "feats": locations[row["utt_id"]]}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def copy_recipe(root: Path, corpus: str = "callcenter") -> Path:
    """A private copy of a recipe (shared code linked in), so runs never touch the source tree.

    Other recipes link the call-centre recipe's model configs, so that one is linked in read-only.
    """
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run tools/install.sh (as root it installs it)")
    for name in ("utils", "tools", "speechllm"):
        (root / name).symlink_to(REPO / name)
    (root / "egs" / "TEMPLATE").mkdir(parents=True)
    (root / "egs" / "TEMPLATE" / "sf1").symlink_to(REPO / "egs" / "TEMPLATE" / "sf1")
    if corpus != "callcenter":
        (root / "egs" / "callcenter").symlink_to(RECIPE.parent)
    shutil.copytree(REPO / "egs" / corpus / "sf1", root / "egs" / corpus / "sf1", symlinks=True,
                    ignore=shutil.ignore_patterns("data", "dump", "exp", "downloads"))
    return root / "egs" / corpus / "sf1"


def sgd_root() -> Path:
    """The shared SGD subset (``$SGD_ROOT``, else ``../shared/data/sgd`` beside the repository)."""
    candidates = [Path(os.environ["SGD_ROOT"])] if "SGD_ROOT" in os.environ else []
    candidates += [REPO.parent / "shared" / "data" / "sgd", Path("/work/shared/data/sgd")]
    for path in candidates:
        if (path / "train" / "schema.json").is_file():
            return path
    pytest.fail(f"the SGD data is missing: set SGD_ROOT (tried {', '.join(map(str, candidates))})")


def run(recipe: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``./run.sh args`` in a recipe copy, with extra environment variables (``cmd_backend="slurm"``)."""
    return subprocess.run(["./run.sh", *args], cwd=recipe, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **env})
