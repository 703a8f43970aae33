"""Nothing lost, nothing silently wrong: one test per way a careful user's probing broke the toolkit.

Each test feeds the bad input (a NaN wav, a killed stage, a second training into one exp dir, a
config value YAML reads as a string, a byte that is not UTF-8, a malformed hypothesis, a hostile
generation, ``--stage three``...) and asserts what it gets: a counted skip, or an error that names
the file, line or key. The README's table "Bad input and what it gets" lists the same cases.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import RECIPE, REPO, copy_recipe, make_tiny_speechllm, run, tiny_llm_dict, write_examples
import speechllm.decode
import speechllm.io_utils
import speechllm.train
from speechllm.bin import decode as decode_bin
from speechllm.bin import dump_feats
from speechllm.bin import train as train_bin
from speechllm.bin.score import score_files
from speechllm.data import TokenizedSet, tokenized
from speechllm.formatting import build_examples
from speechllm.io_utils import InputError, atomic_write, read_json, read_kaldi_map, replace_dir
from speechllm.lock import exclusive
from speechllm.model.builder import save_model, tiny_base_llm
from speechllm.model.llm import LLMConfig
from speechllm.parsing import first_braced, parse_slots
from speechllm.run_log import cut_back
from speechllm.train import Trainer, build_and_train
from speechllm.align import alignment_data
from speechllm.train_config import AlignConfig, TrainConfig

WHISPER = RECIPE / "conf" / "whisper" / "tiny_random.yaml"
ROWS = [{"utt_id": f"u{i}", "prompt": "<audio>\nFind the slots.", "target": '{"amount": "%d dollars"}' % (10 * i),
         "text": f"{10 * i} dollars", "slots": {"amount": f"{10 * i} dollars"}, "n_frames_to_make": 20 + 4 * i}
        for i in range(8)]


def trainer_on(tmp_path: Path, nan_rows: set[str] = frozenset(), valid: bool = False, **cfg) -> Trainer:
    """A tiny model's trainer on ``ROWS``, the features of ``nan_rows`` all NaN; ``valid``: the rows are
    the validation set too."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    jsonl = write_examples(tmp_path, [dict(r) for r in ROWS])
    if nan_rows:  # the same shapes, so the rows' ark offsets stay right
        feats = dict(kaldiio.load_scp(str(tmp_path / "feats.scp")))
        with kaldiio.WriteHelper(f"ark,scp:{tmp_path / 'feats.ark'},{tmp_path / 'feats.scp'}") as writer:
            for key, mat in feats.items():
                writer(key, np.full_like(mat, np.nan) if key in nan_rows else mat)
    torch.manual_seed(0)
    model, spec, base = make_tiny_speechllm(tmp_path / "model", [t for r in ROWS for t in (r["prompt"], r["target"])])
    config = TrainConfig(**{"batch_size": 2, "grad_accum": 1, "max_steps": 4, "lr": 2e-3, "adapter_hidden": 32,
                            "log_every": 1, "save_every": 100, "seed": 5, **cfg})
    exp = tmp_path / "exp"
    train = tokenized(model, jsonl, exp / "tokens")
    alignment = alignment_data(exp / "align", train, train if valid else None) if config.align.steps else None
    return Trainer(model, spec, config, train, train if valid else None, exp, base, alignment=alignment)


def trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


# -- 1. non-finite audio, losses and weights ---------------------------------------------------------------
def test_stage1_skips_and_counts_audio_or_features_that_are_not_finite(tmp_path, monkeypatch, caplog):
    data = tmp_path / "data"
    data.mkdir()
    tone = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    sf.write(data / "good.wav", tone, 16000, subtype="FLOAT")
    sf.write(data / "nan.wav", np.where(np.arange(16000) % 1000 == 0, np.nan, tone).astype(np.float32), 16000,
             subtype="FLOAT")
    sf.write(data / "blows_up.wav", tone[::-1].copy(), 16000, subtype="FLOAT")
    (data / "wav.scp").write_text("".join(f"{k} {data / k}.wav\n" for k in ("blows_up", "good", "nan")))
    real = dump_feats.encode_audio

    def encoder(model, audio, pad_30s):  # the encoder's output of one turn overflows
        out = real(model, audio, pad_30s)
        return np.full_like(out, np.inf) if audio[0] == tone[-1] else out

    monkeypatch.setattr(dump_feats, "encode_audio", encoder)
    monkeypatch.setattr(dump_feats, "setup_logging", lambda: None)
    caplog.set_level(logging.INFO)
    dump_feats.main(["--data_dir", str(data), "--outdir", str(tmp_path / "dump"), "--whisper", str(WHISPER),
                     "--device", "cpu", "--asr", "false"])
    skipped = read_kaldi_map(tmp_path / "dump" / "skipped.1")
    assert skipped == {"nan": "not finite (16 NaN or infinite samples)",
                       "blows_up": "not finite (the encoder's output)"}
    assert list(kaldiio.load_scp(str(tmp_path / "dump" / "feats.1.scp"))) == ["good"]
    assert not (tmp_path / "dump" / "text_asr.1").exists()  # --asr false: no transcripts, not empty ones
    assert "1 utterances encoded (1 in this run), 2 skipped" in caplog.text


def test_a_non_finite_step_is_skipped_and_counted_and_never_reaches_the_weights(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer = trainer_on(tmp_path, nan_rows={"u3"})
    trainer.train()
    assert trainer.n_nonfinite == 1 and trainer.step == 4
    assert trainer.scheduler.get_last_lr() == [0.0, 0.0]  # the schedule's end: it counted the skipped step too
    assert all(torch.isfinite(t).all() for t in trained(trainer).values())
    assert "loss or gradient not finite: update skipped (1 so far; rows include" in caplog.text
    assert "u3" in caplog.text.split("update skipped")[1].splitlines()[0]
    log = [json.loads(line) for line in (tmp_path / "exp" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and sum("loss" in r for r in log) == 3  # the skipped step's record has no loss
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    assert "4 steps (1 skipped: not finite)" in caplog.text


def test_many_non_finite_steps_stop_the_run_with_an_error(tmp_path):
    trainer = trainer_on(tmp_path, nan_rows={f"u{i}" for i in range(8)}, max_nonfinite_steps=2)
    with pytest.raises(RuntimeError, match=r"3 training steps had a non-finite loss or gradient \(more than "
                                           r"max_nonfinite_steps 2\): check the features of .*examples.jsonl"):
        trainer.train()
    assert not (tmp_path / "exp" / "model").exists()


def test_the_alignment_phase_skips_non_finite_steps_too(tmp_path, caplog):
    align = AlignConfig(steps=6, batch_size=4, eval_every=100)
    trainer = trainer_on(tmp_path, nan_rows={"u3"}, align=align, max_steps=1)
    trainer.train()
    assert "CTC loss or gradient not finite: update skipped" in caplog.text
    saved = torch.load(tmp_path / "exp" / "align" / "adapter.pt")
    assert all(torch.isfinite(t).all() for t in saved.values())
    with pytest.raises(RuntimeError, match="3 alignment steps had a non-finite loss or gradient"):
        trainer_on(tmp_path / "all", nan_rows={f"u{i}" for i in range(8)}, align=align, max_nonfinite_steps=2).train()
    assert not (tmp_path / "all" / "exp" / "align" / "adapter.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = trainer_on(tmp_path)
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param[0] = float("nan")
    with pytest.raises(RuntimeError, match=rf"step 0: 1 trained tensors hold non-finite values \(first: {name}\)"):
        trainer.save_checkpoint()
    assert not (tmp_path / "exp" / "checkpoints").exists()


# -- 2. stale stage outputs ------------------------------------------------------------------------------
def test_a_stage1_that_does_not_complete_leaves_no_feats_scp_and_stage2_refuses(tmp_path):
    recipe = copy_recipe(tmp_path)
    for dset in ("train", "dev", "test"):
        (recipe / "data" / dset).mkdir(parents=True)
        (recipe / "data" / dset / "wav.scp").write_text("")
        (recipe / "dump" / dset).mkdir(parents=True)
        (recipe / "dump" / dset / "feats.scp").write_text("old dump/train/split2/feats.1.ark:7\n")  # an old run's
        (recipe / "dump" / dset / "regular.jsonl").write_text("{}\n")  # and its stage 2's
    proc = run(recipe, "--preset", "mini", "--stage", "1", "--stop_stage", "1", "--whisper", "missing.yaml")
    assert proc.returncode != 0
    assert not (recipe / "dump" / "train" / "feats.scp").exists()
    assert not (recipe / "dump" / "train" / "regular.jsonl").exists()  # its rows pointed into the old arks
    proc = run(recipe, "--preset", "mini", "--stage", "2", "--stop_stage", "2")
    assert proc.returncode != 0
    assert "dump/train/feats.scp missing: stage 1 has not completed for data/train (run it)" in proc.stderr


def test_training_refuses_rows_whose_features_were_rewritten_after_stage2(tmp_path):
    jsonl = write_examples(tmp_path, [dict(r) for r in ROWS])
    model, _, _ = make_tiny_speechllm(tmp_path / "model", ["x"])
    tokenized(model, jsonl, tmp_path / "tokens")
    ark = tmp_path / "feats.ark"
    ark.write_bytes(ark.read_bytes()[:100])  # stage 1 ran again and was killed
    with pytest.raises(InputError, match=rf"{ark} \(features of .*examples.jsonl\) is rewritten since the rows"):
        TokenizedSet(tmp_path / "tokens")
    ark.unlink()
    with pytest.raises(InputError, match=r"feats.ark \(features of .*examples.jsonl\) is gone since the rows"):
        TokenizedSet(tmp_path / "tokens")


# -- 3. stage 5 and a partial decode ---------------------------------------------------------------------
def refs_file(tmp_path: Path, n: int = 4) -> Path:
    ref = tmp_path / "dump" / "ref.jsonl"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text("".join(json.dumps({"id": f"u{i}", "utt_id": f"u{i}", "feats": None, "prompt": "", "target": "",
                                       "slots": {"amount": f"{i} dollars"}}) + "\n" for i in range(n)))
    return ref


def hyp_file(tmp_path: Path, lines: list[str]) -> Path:
    hyp = tmp_path / "decode_test_regular" / "hyp.jsonl"
    hyp.parent.mkdir(parents=True, exist_ok=True)
    hyp.write_text("".join(f"{line}\n" for line in lines))
    return hyp


def test_stage5_refuses_a_partial_decode_unless_allowed(tmp_path):
    ref = refs_file(tmp_path)
    hyp = hyp_file(tmp_path, [json.dumps({"id": f"u{i}", "slots": {"amount": f"{i} dollars"}}) for i in (0, 2)])
    with pytest.raises(InputError, match=rf"{hyp} has no hypothesis for 2 of the 4 utterances of .*ref.jsonl "
                                         rf"\(first: u1\): the decode in {hyp.parent} is incomplete.*--allow_missing"):
        score_files(ref, hyp)
    result = score_files(ref, hyp, allow_missing=True)
    assert (result["n_missing"], result["exact"]["tp"], result["exact"]["fn"]) == (2, 2, 2)
    with pytest.raises(InputError, match=r"missing.jsonl does not exist for 4 of the 4 utterances"):
        score_files(ref, tmp_path / "missing.jsonl")


# -- 4. one training per experiment dir ------------------------------------------------------------------
def hold(exp: Path) -> subprocess.Popen:
    """A process that holds ``exp``'s lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from speechllm.lock import exclusive\nwith exclusive(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(120)", str(exp)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_training_into_a_held_exp_dir_is_refused_naming_the_holder(tmp_path):
    exp = tmp_path / "exp"
    holder = hold(exp)
    try:
        with pytest.raises(InputError, match=rf"{exp} is in use by PID {holder.pid} on .* since .*: wait for it"):
            train_bin.main(["--train_jsonl", str(tmp_path / "train.jsonl"), "--train_config",
                            str(RECIPE / "conf" / "train_mini.yaml"), "--llm_config",
                            str(RECIPE / "conf" / "llm" / "tiny_llama.yaml"), "--outdir", str(exp)])
        assert not (exp / "train.yaml").exists()  # refused before it wrote anything
    finally:
        holder.kill()
        holder.wait()
    with exclusive(exp):  # the kernel released the killed holder's lock
        pass


def test_a_waiting_lock_is_taken_when_its_holder_ends(tmp_path):
    """The alignment phase waits for a mode started beside it to finish aligning, then reuses its work."""
    import threading

    exp = tmp_path / "align"
    holder = hold(exp)
    taken = threading.Event()

    def take() -> None:
        with exclusive(exp, "alignment", wait=True):
            taken.set()

    waiter = threading.Thread(target=take)
    waiter.start()
    try:
        assert not taken.wait(1.0)  # still held
    finally:
        holder.kill()
        holder.wait()
    waiter.join(10)
    assert taken.is_set()
    assert f"PID {os.getpid()} " in (exp / ".lock").read_text()


def test_stage3_goes_on_where_the_file_system_cannot_lock(tmp_path):
    recipe = copy_recipe(tmp_path)
    exp = recipe / "exp" / "tiny_llama_regular"
    exp.mkdir(parents=True)
    (exp / ".lock").write_text("")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "flock").write_text("#!/bin/sh\nexit 71\n")  # flock(1) on a mount without locks: not "held"
    (fake / "flock").chmod(0o755)
    proc = run(recipe, "--preset", "mini", "--stage", "3", "--stop_stage", "3", "--mode", "regular",
               PATH=f"{fake}:{os.environ['PATH']}")
    assert "is in use" not in proc.stdout
    assert "dump/train/regular.jsonl not found (stage 2 writes it)" in proc.stdout + proc.stderr + (
        exp / "train.log").read_text()


def test_stage3_leaves_the_log_of_a_running_training_alone(tmp_path):
    recipe = copy_recipe(tmp_path)
    exp = recipe / "exp" / "tiny_llama_regular"
    exp.mkdir(parents=True)
    (exp / "train.log").write_text("the running training's log\n")
    holder = hold(exp)
    try:
        proc = run(recipe, "--preset", "mini", "--stage", "3", "--stop_stage", "3", "--mode", "regular")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0 and f"Error: exp/tiny_llama_regular is in use by PID {holder.pid}" in proc.stdout
    assert sorted(p.name for p in exp.iterdir()) == [".lock", "train.log"]  # nothing moved aside or written
    assert (exp / "train.log").read_text() == "the running training's log\n"


def test_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    target = tmp_path / "loss.png"
    with atomic_write(target) as first, atomic_write(target) as second:
        first.write("first")
        second.write("second")
    assert target.read_text() == "first"  # the outer block renames last
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left behind


def test_stage_scripts_merge_aside_and_keep_earlier_logs(tmp_path):
    script = f"""set -e; . {REPO / 'utils' / 'files.sh'}; nj=2
    echo a > part.1; echo b > part.2
    merge merged cat $(job_files part. "")
    echo first > train.log; keep_log train.log; echo second > train.log; keep_log train.log; echo third > train.log
    merge broken cat part.1 part.3 2> /dev/null || echo refused"""
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "refused\n"  # a missing job's file fails the merge
    assert (tmp_path / "merged").read_text() == "a\nb\n"
    logs = {p.name: p.read_text() for p in tmp_path.glob("train.log*")}
    assert logs == {"train.log.1": "first\n", "train.log.2": "second\n", "train.log": "third\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "part.1", "part.2", "train.log", "train.log.1",
                                                          "train.log.2"]  # nothing half-written left


# -- 5. typed configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "error"), [("1e-3", None), ('"fast"', r"lr: expected float, got 'fast'")])
def test_config_numbers_yaml_reads_as_strings_are_converted_or_named(tmp_path, value, error):
    config = tmp_path / "train.yaml"
    config.write_text(f"base: {RECIPE / 'conf' / 'train_mini.yaml'}\nlr: {value}\n")
    args = ["--train_jsonl", str(tmp_path / "none.jsonl"), "--train_config", str(config), "--llm_config",
            str(RECIPE / "conf" / "llm" / "tiny_llama.yaml"), "--outdir", str(tmp_path / "exp")]
    if error is None:  # converted: training gets as far as its data
        with pytest.raises(InputError, match="none.jsonl not found"):
            train_bin.main(args)
        assert "lr: 0.001\n" in (tmp_path / "exp" / "train.yaml").read_text()
    else:
        with pytest.raises(InputError, match=rf"{config}: {error}"):
            train_bin.main(args)


# -- 6. text inputs named by file and line ---------------------------------------------------------------
def test_a_byte_that_is_not_utf8_is_named_by_file_line_and_column(tmp_path):
    text = tmp_path / "text"
    text.write_bytes(b"u1 hello\nu2 caf\xe9 au lait\n")
    with pytest.raises(InputError, match=rf"{text}:2: not UTF-8 text \(byte 0xe9 at column 7\)"):
        read_kaldi_map(text)


def test_windows_line_ends_are_line_ends(tmp_path):
    text = tmp_path / "text"
    text.write_bytes(b"u1 hello\r\nu2\r\n")  # text_asr: an empty transcript is a key alone
    assert read_kaldi_map(text, allow_empty_value=True) == {"u1": "hello", "u2": ""}


def test_a_truncated_json_file_is_named_by_file_and_line(tmp_path):
    inventory = tmp_path / "slot_inventory.json"
    inventory.write_text('{\n "amount": "the amount",\n "name": "the na')
    with pytest.raises(InputError, match=rf"{inventory}:3: malformed JSON \(Unterminated string"):
        read_json(inventory)


# -- 7. the scorer on malformed hypotheses ---------------------------------------------------------------
@pytest.mark.parametrize(("line", "problem"), [
    ('{"id": "u1", "slots": "amount: 1 dollars"}', "'slots' must map labels to a string, null or a list"),
    ('{"id": "u1", "slots": ["1 dollars"]}', "'slots' must map labels to a string, null or a list"),
    ('{"id": "u1", "slots": {"amount": 1}}', "'slots' must map labels to a string, null or a list"),
    ('{"id": "u1", "slots": {"amount": "1 dollars"}, "parseable": "false"}', "'parseable' must be true or false"),
    ('{"id": "u1", "slots": {"amount": "1 dol', "not a JSON object"),
], ids=["slots a string", "slots a list", "a number value", "parseable a string", "cut-off line"])
def test_a_malformed_hypothesis_line_counts_as_unparseable_and_is_named(tmp_path, caplog, line, problem):
    ref = refs_file(tmp_path, 3)
    hyp = hyp_file(tmp_path, [json.dumps({"id": "u0", "slots": {"amount": "0 dollars"}}), line,
                              json.dumps({"id": "u2", "slots": {"amount": "2 dollars"}})])
    result = score_files(ref, hyp)
    assert (result["n_unparseable"], result["n_missing"], result["exact"]["tp"], result["exact"]["fn"]) == (1, 0, 2, 1)
    assert f"{hyp}:2: {problem}" in caplog.text and "u1 counted as unparseable" in caplog.text


@pytest.mark.parametrize(("line", "problem"), [('{"id": 1, "slots": {}}', "'id' must be a string, got 1"),
                                               ('{"id": "u1\\u12", "slots": {', "not a JSON object")],
                         ids=["a number", "a cut escape"])
def test_a_hypothesis_line_without_a_readable_id_is_left_out_and_named(tmp_path, caplog, line, problem):
    ref = refs_file(tmp_path, 2)
    hyp = hyp_file(tmp_path, [json.dumps({"id": "u0", "slots": {}}), line])
    with pytest.raises(InputError, match="has no hypothesis for 1 of the 2"):
        score_files(ref, hyp)
    assert f"{hyp}:2: {problem}: no id to count it for, left out" in caplog.text


def test_a_duplicated_hypothesis_id_is_an_error(tmp_path):
    ref = refs_file(tmp_path, 2)
    hyp = hyp_file(tmp_path, [json.dumps({"id": u, "slots": {}}) for u in ("u0", "u1", "u0")])
    with pytest.raises(InputError, match=rf"{hyp}:3: duplicate id 'u0' \(also on line 1\)"):
        score_files(ref, hyp)


# -- 8. a parser in linear time --------------------------------------------------------------------------
HOSTILE = st.lists(st.sampled_from(list("{}[]\"'\\:, ab1<>/") + ["<response>", "</response>", "<thinking>",
                                                                 "</thinking>", "None"]), max_size=200).map("".join)


def balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


@settings(max_examples=400, deadline=None)
@given(HOSTILE)
def test_the_parser_never_raises_on_hostile_text(text):
    out = parse_slots(text)
    assert isinstance(out.parseable, bool) and isinstance(out.slots, dict)
    assert all(isinstance(k, str) and (isinstance(v, str) or all(isinstance(x, str) for x in v))
               for k, v in out.slots.items())
    braced = first_braced(text)
    assert braced is None or (braced in text and braced[0] == "{" and braced[-1] == "}")


@pytest.mark.parametrize("text", ["{" * 200_000, "{'a" * 70_000, '{"' * 100_000 + "}" * 100_000,
                                  "{}" * 100_000 + "{" * 100_000, "<response>" * 20_000 + "{" * 100_000],
                         ids=["open braces", "open quotes", "nested", "pairs then open", "tags then braces"])
def test_the_parser_takes_one_pass_over_long_hostile_text(text):
    # 20k open braces took 71 s with a scan per brace; one pass over 200k characters takes well under a second.
    # The bound is generous (a slow machine), yet far below what any scan per brace costs.
    start = time.process_time()
    out = parse_slots(text)
    assert time.process_time() - start < 10
    assert isinstance(out.parseable, bool)


def test_the_first_pair_to_open_is_found_inside_unclosed_braces():
    assert first_braced('{ {"a": "1"} {"b": "2"}') == '{"a": "1"}'
    assert first_braced('{ { {"b": "2"} }') == '{ {"b": "2"} }'
    assert first_braced('x {"a": "}"} y') == '{"a": "}"}'  # a brace inside a string is text
    assert first_braced("{'it's'}") is None and first_braced("{ it's }") == "{ it's }"


# -- 9. options that would run nothing -------------------------------------------------------------------
@pytest.mark.parametrize(("flag", "value", "kind"), [("--stage", "three", "an integer"),
                                                     ("--query_prob", "half", "a number"),
                                                     ("--asr", "yes", "true or false"),
                                                     ("--nj", "two", "an integer")])
def test_a_flag_value_of_the_wrong_kind_stops_the_run(tmp_path, flag, value, kind):
    recipe = copy_recipe(tmp_path)
    proc = run(recipe, "--preset", "mini", "--stage", "1", flag, value)  # a preset or an earlier flag changes no kind
    assert proc.returncode != 0
    assert f"./sf.sh: {flag} takes {kind}, got '{value}'" in proc.stderr
    assert "Stage " not in proc.stdout and not (recipe / "data").exists()


def test_a_flag_takes_the_kind_of_the_script_s_default_not_the_preset_s(tmp_path):
    recipe = copy_recipe(tmp_path)
    (recipe / "conf" / "preset" / "always_query.sh").write_text("query_prob=1\n")  # an integer over a number
    proc = run(recipe, "--preset", "always_query", "--query_prob", "0.25", "--stage", "6")  # stage 6: none
    assert proc.returncode == 0, proc.stderr
    assert "Successfully finished." in proc.stdout


# -- 10. initialisation that does not depend on what is cached -------------------------------------------
def test_a_prebuilt_tiny_llm_does_not_change_the_initial_weights(tmp_path):
    jsonl = write_examples(tmp_path, [dict(r) for r in ROWS[:4]])
    cfg = TrainConfig(batch_size=2, grad_accum=1, max_steps=2, adapter_hidden=16, lr=0.0, adapter_lr=0.0,
                      save_every=100)
    fresh = build_and_train(tiny_llm_dict(), cfg, jsonl, None, tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "base_llm", tmp_path / "b" / "base_llm")  # as a rerun finds it
    rerun = build_and_train(tiny_llm_dict(), cfg, jsonl, None, tmp_path / "b")
    weights = [{n: p.detach() for n, p in m.named_parameters() if p.requires_grad} for m in (fresh, rerun)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:  # lr 0: the weights after two steps are the initial ones
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=0, msg=name)


def test_a_tiny_llm_built_from_other_settings_is_refused(tmp_path):
    """A rerun with another tokenizer family would otherwise train on the old base (no <think> tokens)."""
    texts = lambda: ["find the slots"] * 3  # noqa: E731
    base = tiny_base_llm(LLMConfig(**tiny_llm_dict()), texts, tmp_path / "base_llm")
    assert tiny_base_llm(LLMConfig(**tiny_llm_dict()), texts, base) == base  # the same settings: reused
    with pytest.raises(InputError, match="built from other tiny settings.*'tiny_tokens': 'generic'"):
        tiny_base_llm(LLMConfig(**tiny_llm_dict(tiny_tokens="qwen3")), texts, base)


# -- 11. every drop counted and named; logs that match the checkpoint ------------------------------------
def test_every_utterance_stage2_leaves_out_is_counted_named_and_listed(tmp_path, caplog):
    data, dump = tmp_path / "data", tmp_path / "dump"
    data.mkdir()
    dump.mkdir()
    (data / "text").write_text("u1 one\nu2 two\nu5 five\n")
    (data / "slots.jsonl").write_text("".join(json.dumps({"utt_id": u, "slots": {}}) + "\n"
                                              for u in ("u1", "u4", "u5")))
    (dump / "feats.scp").write_text("u1 f.ark:1\nu2 f.ark:2\nu3 f.ark:3\n")
    (dump / "skipped").write_text("u5 empty\n")
    (dump / "text_asr").write_text("u1 one\nu2 two\nu3 three\n")
    examples = build_examples(data, dump)
    assert [row["utt_id"] for row in examples["regular"]] == ["u1"]
    assert read_kaldi_map(dump / "dropped") == {
        "u2": "no slots line", "u3": "features but no line in text", "u4": "a slots line but no line in text",
        "u5": f"skipped by stage 1 (see {dump / 'skipped'})"}
    assert f"4 utterances of {data} are left out" in caplog.text
    assert "1 features but no line in text: u3" in caplog.text and "1 no slots line: u2" in caplog.text


def test_a_resumed_run_logs_each_step_once(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                                           {"step": 2, "epoch": 1, "valid_loss": 2.5},
                                                           {"step": 3, "loss": 1.0}]))
    cut_back(log, 2)  # the checkpoint is at step 2: step 3 is trained again
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 2]
    cut_back(tmp_path / "none.jsonl", 2)  # a first run has no log yet


def test_a_killed_training_resumes_with_its_log_cut_back_to_the_checkpoint(tmp_path, monkeypatch):
    step = Trainer.train_step

    def dies_at_step_6(self, group, micro):
        if self.step == 5:
            raise KeyboardInterrupt  # killed after the checkpoint of step 4
        return step(self, group, micro)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        trainer_on(tmp_path, valid=True, max_steps=8, save_every=4).train()
    log = tmp_path / "exp" / "train_log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 6, "lo')  # killed while writing
    monkeypatch.setattr(Trainer, "train_step", step)
    trainer_on(tmp_path, valid=True, max_steps=8, save_every=4).train()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    # the checkpoint of step 4 closed the first epoch: its validation is logged once, by the resumed run
    assert [(r["step"], "valid_loss" in r) for r in rows] == [(s, False) for s in range(1, 5)] + [(4, True)] + [
        (s, False) for s in range(5, 9)] + [(8, True)]


def test_a_run_killed_between_its_last_checkpoint_and_its_epoch_s_validation_logs_it_once(tmp_path, monkeypatch):
    real = speechllm.train.validation_loss

    def killed(*args):
        raise KeyboardInterrupt  # after the checkpoint of step 4, the last step, which ends the epoch

    monkeypatch.setattr(speechllm.train, "validation_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer_on(tmp_path, valid=True, max_steps=4, save_every=4).train()
    monkeypatch.setattr(speechllm.train, "validation_loss", real)
    trainer_on(tmp_path, valid=True, max_steps=4, save_every=4).train()
    rows = [json.loads(line) for line in (tmp_path / "exp" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], "valid_loss" in r) for r in rows] == [(1, False), (2, False), (3, False), (4, False),
                                                              (4, True)]


def test_a_directory_replaced_is_never_lost(tmp_path, monkeypatch):
    dest, new = tmp_path / "model", tmp_path / "model.new"
    for path, text in ((dest, "old"), (new, "new")):
        path.mkdir()
        (path / "weights").write_text(text)
    real, calls = os.replace, []

    def interrupted(a, b):
        calls.append(b)
        if len(calls) == 2:  # the new one moving in
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(speechllm.io_utils.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, dest)
    assert (dest / "weights").read_text() == "old"  # put back
    monkeypatch.setattr(speechllm.io_utils.os, "replace", real)
    replace_dir(new, dest)
    assert (dest / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- 12. no validation set: no validation record ---------------------------------------------------------
def test_without_a_validation_set_no_validation_loss_is_logged(tmp_path):
    trainer = trainer_on(tmp_path, max_steps=8)  # two epochs of four steps
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "exp" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and not any("valid_loss" in r for r in rows)


# -- stage 4 killed at a random point, then run again -----------------------------------------------------
class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def decode_job(tmp_path_factory):
    """A saved tiny model dir and 13 examples: 7 batches of 2 (the last one of 1)."""
    root = tmp_path_factory.mktemp("decode")
    rows = [dict(r, utt_id=f"v{i:02d}", n_frames_to_make=10 + 3 * i) for i, r in enumerate(ROWS * 2) if i < 13]
    for r in rows:
        r["n_frames"] = r["n_frames_to_make"]
    jsonl = write_examples(root, rows)
    torch.manual_seed(0)
    model, spec, base = make_tiny_speechllm(root / "model", [t for r in ROWS for t in (r["prompt"], r["target"])])
    spec.max_target_tokens = 12
    save_model(model, spec, root / "model_dir", base)
    return root / "model_dir", jsonl


def decode(model_dir: Path, jsonl: Path, output: Path) -> None:
    decode_bin.main(["--model_dir", str(model_dir), "--jsonl", str(jsonl), "--output", str(output), "--batch_size",
                     "2", "--device", "cpu"])


@pytest.mark.parametrize("seed", [14, 7, 5, 0])  # killed after 0, 2, 4 and 6 of the 7 batches
def test_a_decode_killed_at_a_random_point_and_rerun_equals_an_uninterrupted_one(decode_job, tmp_path, monkeypatch,
                                                                                 seed, caplog):
    model_dir, jsonl = decode_job
    monkeypatch.setattr(decode_bin, "setup_logging", lambda: None)
    decode(model_dir, jsonl, tmp_path / "uninterrupted.jsonl")

    kept = random.Random(seed).randint(0, 6)  # whole batches written before the kill
    kill_at, generated, real = kept, [], speechllm.decode._generate_batch

    def generate(model, chunk, *args):
        if len(generated) == kill_at:
            raise Killed
        generated.append([e.id for e in chunk])
        return real(model, chunk, *args)

    monkeypatch.setattr(speechllm.decode, "_generate_batch", generate)
    output = tmp_path / "hyp.jsonl"
    with pytest.raises(Killed):
        decode(model_dir, jsonl, output)
    assert not output.exists()  # hyp.jsonl appears only when every batch is done
    partial = Path(f"{output}.partial")
    with open(partial, "a") as f:
        f.write('[{"id": "v0')  # killed while writing the next batch
    generated.clear()
    kill_at = None
    caplog.set_level(logging.INFO)
    decode(model_dir, jsonl, output)
    assert f"resuming: {kept} batches ({2 * kept} examples) already decoded" in caplog.text
    assert len(generated) == 7 - kept  # the kept batches were not generated again
    assert output.read_bytes() == (tmp_path / "uninterrupted.jsonl").read_bytes()
    generated.clear()
    monkeypatch.setattr(decode_bin, "load_model", None)  # a completed job run again loads no model
    decode(model_dir, jsonl, output)
    assert generated == [] and output.read_bytes() == (tmp_path / "uninterrupted.jsonl").read_bytes()
