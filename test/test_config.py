"""Configs: typed values, ``base:`` chains, ``--train_args`` overrides, and the experiment's recorded config."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_llm_dict, write_examples
from speechllm.bin import train as train_cli
from speechllm.config import differences, from_dict, load_config, load_yaml_dataclass, merge, parse_overrides
from speechllm.io_utils import InputError
from speechllm.model.llm import LLMConfig
from speechllm.train_config import TrainConfig


def test_overrides_are_typed_nested_and_beat_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("lr: 5.0e-4\nmax_minutes: 6\nalign:\n  steps: 10\n  lr: 0.01\n")
    values = merge(load_config(path), parse_overrides("lr=1e-3 max_minutes=null align.steps=600 seed=7"))
    cfg = from_dict(TrainConfig, values, str(path))
    assert (cfg.lr, cfg.max_minutes, cfg.seed) == (1e-3, None, 7)
    assert (cfg.align.steps, cfg.align.lr) == (600, 0.01)  # the sibling key of the block is kept


@pytest.mark.parametrize("text,match", [
    ("lr", r"--train_args: expected key=value, got 'lr'"),
    ("=3", r"--train_args: expected key=value, got '=3'"),
    ("name=[a", r"--train_args: name: '\[a' is not a YAML value"),
])
def test_malformed_overrides_name_the_flag(text, match):
    with pytest.raises(InputError, match=match):
        parse_overrides(text, "--train_args")


@pytest.mark.parametrize("yaml_text,expected", [
    ("lr: 1e-3\n", 1e-3),  # YAML 1.1 reads this as a string
    ("lr: 1\n", 1.0),
])
def test_numbers_yaml_reads_as_strings_or_ints_become_floats(tmp_path, yaml_text, expected):
    path = tmp_path / "t.yaml"
    path.write_text(yaml_text)
    lr = load_yaml_dataclass(path, TrainConfig).lr
    assert lr == expected and type(lr) is float


@pytest.mark.parametrize("yaml_text,match", [
    ("lr: fast\n", r"t.yaml: lr: expected float, got 'fast'"),
    ("batch_size: 2.5\n", r"t.yaml: batch_size: expected int, got 2.5"),
    ("batch_size: true\n", r"t.yaml: batch_size: expected int, got True"),
    ("max_minutes: [1]\n", r"t.yaml: max_minutes: expected float or NoneType, got \[1\]"),
    ("align:\n  steps: many\n", r"t.yaml: align: steps: expected int, got 'many'"),
    ("align:\n  stpes: 3\n", r"t.yaml: align: unknown config key\(s\) \['stpes'\] for AlignConfig"),
])
def test_values_of_the_wrong_type_name_the_file_and_key(tmp_path, yaml_text, match):
    path = tmp_path / "t.yaml"
    path.write_text(yaml_text)
    with pytest.raises(InputError, match=match):
        load_yaml_dataclass(path, TrainConfig)


def test_base_chain_resolves_relative_to_each_file_and_refuses_loops(tmp_path):
    (tmp_path / "conf" / "tuning").mkdir(parents=True)
    (tmp_path / "conf" / "train.yaml").write_text("lr: 0.1\nseed: 3\nalign:\n  steps: 5\n  lr: 0.5\n")
    (tmp_path / "conf" / "tuning" / "a.yaml").write_text("base: ../train.yaml\nlr: 0.2\nalign:\n  steps: 6\n")
    (tmp_path / "conf" / "tuning" / "b.yaml").write_text("base: a.yaml\nseed: 4\n")
    assert load_config(tmp_path / "conf" / "tuning" / "b.yaml") == {"lr": 0.2, "seed": 4,
                                                                    "align": {"steps": 6, "lr": 0.5}}
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(InputError, match="chain loops back"):
        load_config(tmp_path / "x.yaml")


def test_a_dotted_override_keeps_the_block_s_other_defaults(tmp_path):
    path = tmp_path / "llm.yaml"
    path.write_text("name_or_path: /models/x\n")  # no lora: block, so the class's defaults hold
    cfg = load_yaml_dataclass(path, LLMConfig, parse_overrides("lora.r=16", "--llm_args"))
    assert cfg.lora == {**LLMConfig(name_or_path="x").lora, "r": 16}
    train = tmp_path / "train.yaml"
    train.write_text("lr: 0.1\n")
    with pytest.raises(InputError, match=r"align: cannot set 3 over \{.*\} \(a block and a single value\)"):
        load_yaml_dataclass(train, TrainConfig, parse_overrides("align=3"))


def test_tuning_configs_resolve_to_what_their_write_ups_ran(tmp_path):
    """The dated write-ups cite these files: their resolved values are pinned, so an edit of the base
    config cannot silently change what they reproduce."""
    tuning = Path(__file__).resolve().parents[1] / "egs" / "callcenter" / "sf1" / "conf" / "tuning"
    got = {f.stem: dataclasses.asdict(load_yaml_dataclass(f, TrainConfig)) for f in sorted(tuning.glob("*.yaml"))}
    common = dict(batch_size=8, grad_accum=1, lr=5e-4, adapter_hidden=2048, stack=4, seed=1, text_first=0.0,
                  ctc_collapse="mix", freeze_audio=False)
    expected = {
        "align_probe": dict(max_steps=1, max_minutes=None, adapter_lr=2e-4, warmup_ratio=0.0, log_every=1,
                            save_every=50, align=dict(steps=600, batch_size=16, lr=1e-3, eval_every=150,
                                                      vocab="transcripts")),
        "align_probe_long": dict(max_steps=1, max_minutes=None, adapter_lr=2e-4, warmup_ratio=0.0,
                                 align=dict(steps=1500, eval_every=150)),
        "train_cpu7": dict(max_steps=400, max_minutes=7, adapter_lr=1e-3, warmup_ratio=0.05, align=dict(steps=0)),
        "train_cpu15_noalign": dict(max_steps=220, max_minutes=15, adapter_lr=1e-3, eval_every=40,
                                    eval_max_examples=40, eval_max_new_tokens=96, align=dict(steps=0)),
        "train_cpu15_align": dict(max_steps=150, max_minutes=15, adapter_lr=1e-3, eval_every=40,
                                  eval_max_new_tokens=96, align=dict(steps=150, eval_every=50, vocab="full")),
        "train_cpu20_noalign": dict(max_steps=400, max_minutes=20, adapter_lr=1e-3, eval_every=15,
                                    eval_max_new_tokens=96, align=dict(steps=0)),
        "train_cpu20_align": dict(max_steps=400, max_minutes=20, adapter_lr=2e-4, eval_every=15,
                                  align=dict(steps=300, eval_every=100, vocab="transcripts"),
                                  audio_input="adapter"),
        "train_cpu20_ctctok": dict(max_steps=400, max_minutes=20, adapter_lr=2e-4, align=dict(steps=300),
                                   audio_input="ctc_tokens"),
        "train_long_ctcaux": dict(max_steps=2000, max_minutes=40, adapter_lr=2e-4, log_every=10, save_every=100,
                                  eval_every=40, align=dict(steps=1200, eval_every=300), audio_input="ctc_tokens",
                                  ctc_weight=0.3),
        "align_probe_corpus": dict(max_steps=1, max_minutes=None, adapter_lr=2e-4, audio_input="adapter",
                                   align=dict(steps=2400, batch_size=16, lr=1e-3, eval_every=300)),
        "train_noalign": dict(max_steps=400, max_minutes=6, adapter_lr=1e-3, align=dict(steps=0),
                              audio_input="adapter"),
        "train_long_noalign": dict(max_steps=2000, max_minutes=40, adapter_lr=1e-3, eval_every=40,
                                   align=dict(steps=0), audio_input="adapter", ctc_weight=0.0),
    }
    assert sorted(got) == sorted(expected)
    for name, values in expected.items():
        for key, value in {**common, **values}.items():
            if isinstance(value, dict):
                assert {k: got[name][key][k] for k in value} == value, (name, key)
            else:
                assert got[name][key] == value, (name, key)


def test_differences_name_nested_keys():
    assert differences({"lr": 0.1, "align": {"steps": 1}}, {"lr": 0.1, "align": {"steps": 2}, "seed": 3}) == \
        ["align.steps: 1 -> 2", "seed: None -> 3"]


def _train(tmp_path, *args: str) -> None:
    rows = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind slots.", "target": '{"x": "a"}', "slots": {"x": "a"}}
            for i in range(4)]
    if not (tmp_path / "examples.jsonl").exists():
        write_examples(tmp_path, rows)
        (tmp_path / "llm.yaml").write_text(yaml.safe_dump(tiny_llm_dict()))
        (tmp_path / "train.yaml").write_text("batch_size: 2\ngrad_accum: 1\nmax_steps: 1\nadapter_hidden: 16\n"
                                             "save_every: 100\nlr: 1.0e-3\n")
    train_cli.main(["--train_jsonl", str(tmp_path / "examples.jsonl"), "--llm_config", str(tmp_path / "llm.yaml"),
                    "--train_config", str(tmp_path / "train.yaml"), "--outdir", str(tmp_path / "exp"),
                    "--device", "cpu", *args])


def test_train_args_reach_training_and_the_recorded_config(tmp_path):
    _train(tmp_path, "--train_args", "max_steps=2 lr=2e-3", "--llm_args", "lora.r=4")
    recorded = yaml.safe_load((tmp_path / "exp" / "train.yaml").read_text())
    assert recorded == dataclasses.asdict(TrainConfig(batch_size=2, grad_accum=1, max_steps=2, adapter_hidden=16,
                                                      save_every=100, lr=2e-3))
    assert yaml.safe_load((tmp_path / "exp" / "llm.yaml").read_text())["lora"]["r"] == 4
    assert [p.name for p in (tmp_path / "exp" / "checkpoints").iterdir()] == ["step_0000002"]
    assert (tmp_path / "exp" / "model" / "speechllm.yaml").exists()


def test_a_run_without_a_checkpoint_takes_a_new_config(tmp_path):
    _train(tmp_path)
    shutil.rmtree(tmp_path / "exp" / "checkpoints")  # as if it had died before its first checkpoint
    _train(tmp_path, "--train_args", "lr=2e-3")
    assert yaml.safe_load((tmp_path / "exp" / "train.yaml").read_text())["lr"] == 2e-3


def test_llm_path_is_taken_as_it_is(tmp_path):
    path = "/models/2024 #1: [x]"  # YAML would read a number, a comment, a mapping and a list here
    with pytest.raises(OSError, match=re.escape(path)):  # no weights there: the loader is given the path
        _train(tmp_path, "--llm_path", path, "--llm_args", "tiny=null")
    recorded = yaml.safe_load((tmp_path / "exp" / "llm.yaml").read_text())
    assert (recorded["name_or_path"], recorded["local_cache"], recorded["tiny"]) == (path, None, None)


def test_a_resume_with_another_config_is_refused_unless_forced(tmp_path):
    _train(tmp_path)
    _train(tmp_path)  # the same config: a resume, accepted
    with pytest.raises(InputError, match=r"(?s)records another config.*lr: 0.001 -> 0.002.*max_steps: 1 -> 2"):
        _train(tmp_path, "--train_args", "max_steps=2 lr=2e-3")
    assert yaml.safe_load((tmp_path / "exp" / "train.yaml").read_text())["max_steps"] == 1  # left as it was
    _train(tmp_path, "--train_args", "max_steps=2 lr=2e-3", "--force_config")
    assert yaml.safe_load((tmp_path / "exp" / "train.yaml").read_text())["max_steps"] == 2
    assert sorted(p.name for p in (tmp_path / "exp" / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
