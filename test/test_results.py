"""Stage 5's run identity: scores.json names its run (LLM, mode, switch, tag, set, Whisper, exp dir), and
the results tables are built from those identities alone, whatever the dirs are called. Also the
Whisper record of stage 1, the modes helper of the shell scripts, and the plots."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from speechllm.bin import modes as modes_bin
from speechllm.bin import results as results_bin
from speechllm.bin import score as score_bin
from speechllm.features import WHISPER_RECORD, read_whisper_record, write_whisper_record
from speechllm.formatting import DECODES, MODES
from speechllm.io_utils import InputError
from speechllm.model.builder import SPEC_FILE
from speechllm.plots import plot_curves, plot_f1, plot_losses

REPO = Path(__file__).resolve().parents[1]

PNG = b"\x89PNG"


def write_stage2(dump_dir: Path, mode: str) -> Path:
    """A stage-2 file of two utterances (a hybrid file holds both switches of each)."""
    rows = []
    for utt, slots in (("u1", {"payment_amount": "30 dollars"}), ("u2", {"new_limit": "5000"})):
        row = {"utt_id": utt, "feats": None, "prompt": "Find all slot values.", "target": json.dumps(slots),
               "slots": slots, "text": ""}
        names = [n for n, (m, _) in DECODES.items() if m == mode]
        for name in names:
            rows.append({**row, "id": f"{utt}#{name}" if len(names) > 1 else utt, "mode": name})
    dump_dir.mkdir(parents=True, exist_ok=True)
    path = dump_dir / f"{mode}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score(tmp_path: Path, ref: Path, mode: str, *identity: str) -> dict:
    hyp = tmp_path / f"hyp_{mode}.jsonl"
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    hyp.write_text("".join(json.dumps({"id": r["id"], "slots": r["slots"]}) + "\n" for r in rows if r["mode"] == mode))
    outdir = tmp_path / f"score_{mode}"
    score_bin.main(["--ref_jsonl", str(ref), "--hyp_jsonl", str(hyp), "--outdir", str(outdir), "--mode", mode,
                    *identity])
    return json.loads((outdir / "scores.json").read_text())


def test_scores_json_names_its_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(score_bin, "setup_logging", lambda: None)
    dump = tmp_path / "dump" / "test"
    hybrid = write_stage2(dump, "hybrid")
    write_whisper_record(dump / WHISPER_RECORD, "base")
    identity = ["--llm", "tiny_llama", "--tag", "lr1e-3", "--set", "test", "--exp_dir", "exp/anything"]
    for mode, think in (("hybrid_think", True), ("hybrid_no_think", False)):
        s = score(tmp_path, hybrid, mode, *identity)
        assert s["run"] == {"llm": "tiny_llama", "mode": "hybrid", "think": think, "tag": "lr1e-3", "set": "test",
                            "whisper": "base", "exp_dir": "exp/anything"}
        assert s["n_utts"] == 2 and s["partial"]["f1"] == 1.0

    # a dump without the record (made before it existed): the Whisper the model dir recorded
    old = tmp_path / "old" / "test"
    regular = write_stage2(old, "regular")
    exp = tmp_path / "exp" / "old_run"
    (exp / "model").mkdir(parents=True)
    (exp / "model" / SPEC_FILE).write_text(yaml.safe_dump({"llm": {"tiny": {}}, "feat_dim": 0,
                                                           "whisper": "/models/whisper.pt"}))
    s = score(tmp_path, regular, "regular", "--llm", "x", "--tag", "", "--set", "test", "--exp_dir", str(exp))
    assert s["run"] == {"llm": "x", "mode": "regular", "think": None, "tag": None, "set": "test",
                        "whisper": "/models/whisper.pt", "exp_dir": str(exp)}
    assert score(tmp_path, regular, "regular")["run"]["whisper"] is None  # no record, no model dir
    with pytest.raises(SystemExit):
        score(tmp_path, regular, "hybrid")  # a row mode that does not exist
    assert "invalid choice: 'hybrid'" in capsys.readouterr().err


def test_whisper_record_is_one_line_naming_a_name_or_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("conf").mkdir()
    Path("conf/whisper.yaml").write_text("name_or_path: tiny\n")
    assert read_whisper_record(tmp_path) is None
    write_whisper_record(tmp_path / WHISPER_RECORD, "conf/whisper.yaml")  # a file: its absolute path
    assert read_whisper_record(Path(".")) == str(tmp_path.resolve() / "conf" / "whisper.yaml")
    write_whisper_record(tmp_path / WHISPER_RECORD, "large-v3")  # a name stays a name
    assert (tmp_path / WHISPER_RECORD).read_text() == "large-v3\n" and read_whisper_record(tmp_path) == "large-v3"
    (tmp_path / WHISPER_RECORD).write_text("base\nsmall\n")
    with pytest.raises(InputError, match=rf"{tmp_path / WHISPER_RECORD}:2: expected one line"):
        read_whisper_record(tmp_path)
    (tmp_path / WHISPER_RECORD).write_text("\n")
    with pytest.raises(InputError, match=rf"{tmp_path / WHISPER_RECORD}:1: empty"):
        read_whisper_record(tmp_path)


def scores_of(f1: float, llm: str, mode: str, think: bool | None = None, tag: str | None = None,
              dset: str = "test") -> dict:
    prf = {"precision": f1, "recall": f1, "f1": f1}
    return {"run": {"llm": llm, "mode": mode, "think": think, "tag": tag, "set": dset, "whisper": "base",
                    "exp_dir": "exp/whatever"},
            "partial": prf, "exact": prf, "slu_f1": prf, "span_f1": prf, "n_utts": 4, "n_unparseable": 1,
            "n_missing": 0, "n_truncated": 0}


def write_scores(ddir: Path, scores: dict) -> Path:
    (ddir / "score").mkdir(parents=True)
    (ddir / "score" / "scores.json").write_text(json.dumps(scores))
    return ddir


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """Decode dirs named nothing like exp/<llm>_<mode>/decode_<set>_<mode>: only scores.json says what they are."""
    made = {"reg": scores_of(0.2, "tiny_llama", "regular"), "rea": scores_of(0.3, "tiny_llama", "reasoning"),
            "nothink": scores_of(0.25, "tiny_llama", "hybrid", think=False),
            "think": scores_of(0.4, "tiny_llama", "hybrid", think=True),
            "casc": scores_of(0.5, "tiny_llama", "cascade"),
            "tagged": scores_of(0.6, "tiny_llama", "regular", tag="lr1e-3"),
            "qwen": scores_of(0.1, "tiny_qwen3", "regular")}
    return {name: write_scores(tmp_path / "exp" / f"run{i}" / "out", s) for i, (name, s) in enumerate(made.items())}


def test_results_tables_come_from_the_scores_identities(runs, tmp_path):
    output = tmp_path / "out" / "RESULTS.md"
    results_bin.main(["--decode_dirs", *map(str, runs.values()), "--output", str(output),
                      "--plot", str(tmp_path / "out" / "RESULTS_f1.png"), "--command", "test"])
    text = output.read_text()
    sections = {s.split("\n")[0]: s for s in text.split("\n## ")}
    table1 = next(s for t, s in sections.items() if t.startswith("Table 1"))
    assert "| tiny_llama | test | 0.2000 / 0.2000 / 0.2000 | 0.3000 / 0.3000 / 0.3000 | +50.00 |" in table1
    assert "| tiny_llama_lr1e-3 | test | 0.6000 / 0.6000 / 0.6000 | - | n/a |" in table1  # the tag is a system
    table2 = next(s for t, s in sections.items() if t.startswith("Table 2"))
    assert "| tiny_llama | test | regular | 0.2000 / 0.2000 / 0.2000 | 0.2500 / 0.2500 / 0.2500 | +25.00 |" in table2
    assert "| tiny_llama | test | reasoning | 0.3000 / 0.3000 / 0.3000 | 0.4000 / 0.4000 / 0.4000 |" in table2
    cascade = next(s for t, s in sections.items() if t.startswith("Cascade"))
    assert "| tiny_llama | test | 0.5000 / 0.5000 / 0.5000 | hybrid_think |" in cascade
    scores = next(s for t, s in sections.items() if t.startswith("All scores"))
    rows = [line.split(" | ")[2] for line in scores.splitlines() if line.startswith("| tiny_llama | ")]
    assert rows == list(DECODES)  # every row mode, in the one order
    assert (tmp_path / "out" / "RESULTS_f1.png").read_bytes()[:4] == PNG and "](RESULTS_f1.png)" in text
    environment = next(s for t, s in sections.items() if t.startswith("Environment"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    assert f"- commit: {head.strip()}" in environment and f"torch {torch.__version__}" in environment


def test_results_select_runs_by_identity(runs, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(results_bin, "setup_logging", lambda: None)  # keep pytest's log capture
    dirs = [str(d) for d in runs.values()]
    results_bin.main(["--decode_dirs", *dirs, "--list", "--llms", "tiny_llama", "--modes", "regular", "--tag", ""])
    assert capsys.readouterr().out == f"{runs['reg']}\n"  # untagged only
    results_bin.main(["--decode_dirs", *dirs, "--list", "--modes", "regular", "--tag", "lr1e-3"])
    assert capsys.readouterr().out == f"{runs['tagged']}\n"
    results_bin.main(["--decode_dirs", *dirs, "--list", "--modes", "hybrid"])
    assert capsys.readouterr().out == f"{runs['nothink']}\n{runs['think']}\n"
    results_bin.main(["--decode_dirs", "--list"])  # nothing scored yet (an empty grid)
    assert capsys.readouterr().out == ""

    old = write_scores(tmp_path / "old", {k: v for k, v in scores_of(0.9, "x", "regular").items() if k != "run"})
    caplog.set_level(logging.WARNING)
    results_bin.main(["--decode_dirs", str(old), *dirs, "--list", "--llms", "tiny_qwen3"])
    assert capsys.readouterr().out == f"{runs['qwen']}\n"
    assert f"{old / 'score' / 'scores.json'} names no run" in caplog.text

    twin = write_scores(tmp_path / "elsewhere", scores_of(0.7, "tiny_llama", "regular"))
    with pytest.raises(InputError, match=f"{runs['reg']} and {twin} both score tiny_llama on test in mode regular"):
        results_bin.main(["--decode_dirs", *dirs, str(twin), "--output", str(tmp_path / "R.md")])
    bad = write_scores(tmp_path / "bad", scores_of(0.7, "tiny_llama", "hybrid"))  # hybrid without its switch
    with pytest.raises(InputError, match="needs an llm, a set, and a mode"):
        results_bin.main(["--decode_dirs", str(bad), "--output", str(tmp_path / "R.md")])
    results_bin.main(["--decode_dirs", str(bad), *dirs, "--list", "--llms", "tiny_qwen3"])  # a grid's search
    assert capsys.readouterr().out == f"{runs['qwen']}\n"
    assert f"{bad / 'score' / 'scores.json'}: run" in caplog.text and "left out" in caplog.text


def test_modes_helper_checks_and_expands(capsys):
    for argv, out in (([], MODES), (["all"], MODES), (["cascade", "regular"], ("regular", "cascade")),
                      (["hybrid,regular"], ("regular", "hybrid")),
                      (["--decode", "hybrid"], ("hybrid_no_think", "hybrid_think")),
                      (["--decode", "all"], tuple(DECODES))):
        modes_bin.main(argv)
        assert capsys.readouterr().out == " ".join(out) + "\n", argv
    with pytest.raises(SystemExit, match="unknown mode 'regular reasoning': regular, reasoning, hybrid, cascade "):
        modes_bin.main(["regular reasoning"])  # sf.sh's --mode is one word: a mode, a comma-separated list, or all


def test_plots_write_pngs(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0},
                                                          {"step": 2, "valid_loss": float("nan")},
                                                          {"step": 2, "valid_loss": 1.5}]))
    plot_losses(log, tmp_path / "loss.png")
    points = [{"step": 50, "train_s": 60, "dev_partial_f1": 0.1, "dev_exact_f1": 0.0},
              {"step": 100, "train_s": 120, "dev_partial_f1": 0.2, "dev_exact_f1": 0.1}]
    plot_curves([("a", points)], tmp_path / "curves.png")
    plot_curves([("a", points), ("b", points[:1])], tmp_path / "steps.png", x="steps")
    plot_f1({("tiny_llama", "test"): {"regular": {"partial": {"f1": 0.0}}, "hybrid_think": {"partial": {"f1": 0.5}}}},
            tmp_path / "new" / "f1.png")
    for name in ("loss.png", "curves.png", "steps.png", "new/f1.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG, name


def test_stage_table_names_each_stage_command_and_commit(runs, tmp_path):
    times = tmp_path / "stage_times.tsv"
    times.write_text("1\t610\t2026-11-30T06:15:24\tdata\n"  # a line from before commands were recorded
                     "3\t40\t2026-11-30T07:00:00\ttiny_llama all\t./run.sh --stage 3 --tag x\tabc1234\n")
    output = tmp_path / "RESULTS.md"
    results_bin.main(["--decode_dirs", *map(str, runs.values()), "--output", str(output),
                      "--stage_times", str(times)])
    text = output.read_text()
    assert "| 1 | data | 610 | 2026-11-30T06:15:24 | - | - |" in text
    assert "| 3 | tiny_llama all | 40 | 2026-11-30T07:00:00 | `./run.sh --stage 3 --tag x` | abc1234 |" in text


def test_novel_turns_are_scored_apart_and_tabled_with_the_alignment(tmp_path, monkeypatch):
    """Stage 5 scores the turns whose values no training text holds on their own, and RESULTS.md sets
    them beside all turns, with the CTC head's value recall and the steps of the exp dir."""
    monkeypatch.setattr(score_bin, "setup_logging", lambda: None)
    monkeypatch.setattr(results_bin, "setup_logging", lambda: None)
    ref = write_stage2(tmp_path / "dump" / "test", "regular")  # u1: "30 dollars", u2: "5000"
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text(json.dumps({"id": "u1", "slots": {"payment_amount": "30 dollars"}}) + "\n"
                   + json.dumps({"id": "u2", "slots": {"new_limit": "4000"}}) + "\n")
    seen = tmp_path / "text"
    seen.write_text("t1 I paid $30 last month\nt2 the limit is 4000\n")  # u1's value seen, u2's not
    exp = tmp_path / "exp" / "run"
    exp.mkdir(parents=True)
    (exp / "train_log.jsonl").write_text('{"step": 4, "text_steps": 4}\n{"step": 5, "loss": 1.0}\n'
                                         '{"step": 10, "loss": 0.5}\n{"step": 10, "valid_loss": 0.7}\n')
    corpus = tmp_path / "corpus"  # the alignment corpus the run read is seen too
    (corpus / "data" / "align").mkdir(parents=True)
    (corpus / "data" / "align" / "text").write_text("c1 my name is maria garcia\n")
    (exp / "alignment.json").write_text(json.dumps({"dir": "x", "corpus": str(corpus), "step": 300, "test_values": 8,
                                                    "test_values_heard": 6, "test_novel_values": 4,
                                                    "test_novel_heard": 1}))
    ddir = tmp_path / "decode"
    score = ["--ref_jsonl", str(ref), "--hyp_jsonl", str(hyp), "--outdir", str(ddir / "score"),
             "--mode", "regular", "--llm", "tiny_llama", "--set", "test", "--exp_dir", str(exp), "--seen_text", str(seen)]
    (corpus / "data" / "align" / "text").write_text("c1 a new limit of 5000\n")  # u2's value
    score_bin.main(score)
    assert json.loads((ddir / "score" / "scores.json").read_text())["novel"]["n_utts"] == 0
    # an alignment.json from before it named the corpus: the alignment dir's align.json does
    aligned = json.loads((exp / "alignment.json").read_text())
    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "align.json").write_text(json.dumps({"corpus": aligned.pop("corpus")}))
    (exp / "alignment.json").write_text(json.dumps({**aligned, "dir": str(tmp_path / "align")}))
    score_bin.main(score)
    assert json.loads((ddir / "score" / "scores.json").read_text())["novel"]["n_utts"] == 0
    output = tmp_path / "RESULTS.md"
    results_bin.main(["--decode_dirs", str(ddir), "--output", str(output)])
    assert "| tiny_llama | test | regular | 0.5000 / - | 0.5000 / - | 0.7619 / - | 0 | " in output.read_text()
    (corpus / "data" / "align" / "text").write_text("c1 my name is maria garcia\n")
    score_bin.main(score)
    scores = json.loads((ddir / "score" / "scores.json").read_text())
    assert scores["partial"]["f1"] == 0.5 and scores["n_utts"] == 2
    assert scores["novel"]["n_utts"] == 1 and scores["novel"]["partial"]["f1"] == 0.0  # u2 alone
    results_bin.main(["--decode_dirs", str(ddir), "--output", str(output)])
    text = output.read_text()
    assert ("| tiny_llama | test | regular | 0.5000 / 0.0000 | 0.5000 / 0.0000 | 0.7619 / 0.6154 | 1 | "
            "0.750 (6/8) / 0.250 (1/4) | 300 | 10 (4 on text) |") in text
    # without --seen_text and alignment, no such table
    score_bin.main(["--ref_jsonl", str(ref), "--hyp_jsonl", str(hyp), "--outdir", str(ddir / "score"),
                    "--mode", "regular", "--llm", "tiny_llama", "--set", "test"])
    results_bin.main(["--decode_dirs", str(ddir), "--output", str(output)])
    assert "novel" not in output.read_text()
