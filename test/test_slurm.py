"""The Slurm backend against a real Slurm: a two-node cluster on this machine (tools/slurm_localhost.sh),
written and started here. Stage 1 and stage 4 through sbatch arrays give the same result as the local
backend with any number of jobs, a failing task is named with its log, and stage 3 trains as one
Slurm job across both nodes (srun + torchrun rendezvous, gloo)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import yaml

from conftest import REPO, copy_recipe, run

RUN_SLURM = str(REPO / "utils" / "run_slurm.py")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running two-node cluster; fails (never skips) with the reason when it cannot start."""
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.fail("the Slurm tests need root and Debian's slurm-wlm and munge: run tools/install.sh as root")
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run([str(REPO / "tools" / "slurm_localhost.sh"), "start", str(state), "2"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"Slurm did not start:\n{proc.stdout}\n{proc.stderr}")
    yield str(state / "slurm.conf")
    subprocess.run([str(REPO / "tools" / "slurm_localhost.sh"), "stop", str(state)], timeout=60)


def run_slurm(slurm: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUN_SLURM, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SLURM_CONF": slurm})


def features(recipe: Path, dset: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in kaldiio.load_scp(str(recipe / "dump" / dset / "feats.scp")).items()}


def stage1_outputs(recipe: Path) -> dict:
    out = {}
    for dset in ("train", "dev", "test"):
        out[dset] = {"feats": features(recipe, dset)}
        for name in ("text_asr", "utt2num_frames", "skipped"):
            out[dset][name] = (recipe / "dump" / dset / name).read_text()
    return out


def assert_same_stage1(a: dict, b: dict) -> None:
    for dset in a:
        assert a[dset].keys() == b[dset].keys()
        for name in ("text_asr", "utt2num_frames", "skipped"):
            assert a[dset][name] == b[dset][name], (dset, name)
        assert a[dset]["feats"].keys() == b[dset]["feats"].keys() and a[dset]["feats"]
        for utt, mat in a[dset]["feats"].items():
            np.testing.assert_array_equal(mat, b[dset]["feats"][utt])


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_and_killed_tasks_are_named_with_their_logs(slurm, tmp_path):
    conf = str(REPO / "egs" / "callcenter" / "sf1" / "conf" / "slurm.conf")
    proc = run_slurm(slurm, "--config", conf, "JOB=1:3", "log/check.JOB.log", "bash", "-c",
                     "echo task JOB on $(hostname); [ JOB -ne 2 ]", cwd=tmp_path)
    assert proc.returncode == 1
    assert "JOB=2: exit status 1, see log/check.2.log" in proc.stderr
    assert "JOB=1" not in proc.stderr.split("failed:")[1] and "JOB=3" not in proc.stderr.split("failed:")[1]
    for i in (1, 3):
        log = (tmp_path / "log" / f"check.{i}.log").read_text()
        assert f"task {i} on" in log and "exit status 0" in log and "Slurm job" in log

    # a task that Slurm kills never reports an exit status: it is named too. Cancel only this
    # task: the array's last task may carry the array's own job id, and scancel of it ends all.
    proc = run_slurm(slurm, "--config", conf, "JOB=1:2", "log/kill.JOB.log", "bash", "-c",
                     "[ JOB -eq 1 ] || { scancel ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; sleep 60; }", cwd=tmp_path)
    assert proc.returncode == 1
    assert "JOB=2: no exit status (killed by Slurm" in proc.stderr and "log/kill.2.log" in proc.stderr
    assert "JOB=1:" not in proc.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_a_task_that_stops_before_the_time_limit_is_run_again(slurm, tmp_path):
    conf = str(REPO / "egs" / "callcenter" / "sf1" / "conf" / "slurm.conf")
    # part 1 of task 2 stops early (as training does before the time limit); task 1 finishes at once
    script = ('n=$(cat count.JOB 2>/dev/null || echo 0); echo $((n + 1)) > count.JOB; '
              'echo "part $((n + 1)) ends at $JOB_END_TIME"; '
              'if [ JOB -eq 2 ] && [ $n -eq 0 ]; then touch "$JOB_RESUME_FLAG"; exit 75; fi')
    submitted = time.time()
    proc = run_slurm(slurm, "--config", conf, "--time", "10", "JOB=1:2", "log/train.JOB.log", "bash", "-c", script,
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "task(s) 2 stopped before the time limit to continue" in proc.stderr
    assert [(tmp_path / f"count.{i}").read_text().strip() for i in (1, 2)] == ["1", "2"]
    log = (tmp_path / "log" / "train.2.log").read_text()
    assert "part 1 ends at" in log and "part 2 ends at" in log and "Stopped early to continue" in log  # one log
    end = int(log.split("part 2 ends at ")[1].split()[0])
    assert submitted + 9 * 60 < end < time.time() + 10 * 60 + 5  # the job's --time 10 (minutes)

    # a task that keeps asking is given up after --max_resubmits and named
    proc = run_slurm(slurm, "--config", conf, "--max_resubmits", "1", "log/loop.log", "bash", "-c",
                     'touch "$JOB_RESUME_FLAG"', cwd=tmp_path)
    assert proc.returncode == 1 and "still unfinished after 1 resubmissions, see log/loop.log" in proc.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_recipe_stages_through_slurm(slurm, tmp_path, monkeypatch):
    recipe = copy_recipe(tmp_path)
    monkeypatch.chdir(recipe)  # scp files hold recipe-relative ark paths, as in ESPnet
    mini = ("--preset", "mini")

    # stage 1 (with stage 0) on the local backend, then through Slurm, then locally with another --nj
    proc = run(recipe, *mini, "--stop_stage", "1", "--nj", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    local = stage1_outputs(recipe)
    proc = run(recipe, *mini, "--stage", "1", "--stop_stage", "1", "--nj", "2", cmd_backend="slurm",
               SLURM_CONF=slurm)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted Slurm job" in proc.stderr
    assert "Slurm job" in (recipe / "dump" / "train" / "split2" / "log" / "dump.2.log").read_text()
    assert_same_stage1(local, stage1_outputs(recipe))
    proc = run(recipe, *mini, "--stage", "1", "--stop_stage", "1", "--nj", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_stage1(local, stage1_outputs(recipe))

    # stage 3 as one Slurm job on both nodes: srun starts a torchrun per node, they meet at node1
    proc = run(recipe, *mini, "--stage", "2", "--stop_stage", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = yaml.safe_load((recipe / "conf" / "train_mini.yaml").read_text())
    (recipe / "conf" / "train_short.yaml").write_text(yaml.safe_dump({**train, "epochs": 1, "max_steps": 4}))
    proc = run(recipe, *mini, "--stage", "3", "--stop_stage", "3", "--mode", "regular", "--num_nodes", "2",
               "--train_config", "conf/train_short.yaml", cmd_backend="slurm", SLURM_CONF=slurm)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = recipe / "exp" / "tiny_llama_regular"
    log = (exp / "train.log").read_text()
    assert "--nodes 2" in proc.stderr and "Slurm job" in log
    assert "2 nodes x 1 processes, rendezvous at" in log and "rank 0 of 2" in log
    assert "effective batch 16 = 8 x 1 x 2 processes" in log
    assert (exp / "model" / "adapter.pt").exists() and (exp / "model" / "lora" / "adapter_config.json").exists()

    # stage 4: the same hypotheses from 2 Slurm jobs as from 1 local job
    hyp = exp / "decode_test_regular" / "hyp.jsonl"
    proc = run(recipe, *mini, "--stage", "4", "--stop_stage", "4", "--mode", "regular", "--nj", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    local_hyp = hyp.read_text()
    proc = run(recipe, *mini, "--stage", "4", "--stop_stage", "4", "--mode", "regular", "--nj", "2",
               cmd_backend="slurm", SLURM_CONF=slurm)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert hyp.read_text() == local_hyp and local_hyp.count("\n") > 0


def load_run_slurm():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_slurm", RUN_SLURM)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_slurm"] = module  # dataclasses resolve their module's names through sys.modules
    spec.loader.exec_module(module)
    return module


def test_slurm_conf_maps_options_to_sbatch_flags(tmp_path):
    run_slurm_module = load_run_slurm()
    conf = REPO / "egs" / "callcenter" / "sf1" / "conf" / "slurm.conf"
    cfg = run_slurm_module.SlurmConfig.read(conf)
    assert cfg.command == ["sbatch", "--export=ALL"]
    assert cfg.flags({"gpu": "4", "num_nodes": "2", "mem": "8G"}, conf) == [
        "--time", "24:00:00", "--gres=gpu:4", "--nodes", "2", "--ntasks-per-node", "1",
        "--mem-per-cpu", "8G"]
    assert cfg.flags({"num_threads": "1", "time": "1:00:00"}, conf) == ["--time", "1:00:00", "--cpus-per-task", "1"]

    bad = tmp_path / "slurm.conf"
    bad.write_text("command sbatch\noption gpu=* --gres=gpu:$0\nopton mem=* --mem $0\n")
    with pytest.raises(run_slurm_module.ConfigError, match=r"slurm.conf:3: expected"):
        run_slurm_module.SlurmConfig.read(bad)
    bad.write_text("command sbatch\n")
    with pytest.raises(run_slurm_module.ConfigError, match=r"no 'option mem=\.\.\.' line for --mem 8G"):
        run_slurm_module.SlurmConfig.read(bad).flags({"mem": "8G"}, bad)


def test_multi_node_training_outside_slurm_is_refused():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([str(REPO / "utils" / "torchrun.sh"), "--nnodes", "2", "-m", "speechllm.bin.train"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "needs a Slurm allocation of 2 nodes" in proc.stderr
    proc = subprocess.run([str(REPO / "utils" / "run_local.sh"), "--num_nodes", "2", "log", "true"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "the local backend has one node" in proc.stderr
