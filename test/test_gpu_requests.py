"""Every stage asks its backend for GPUs: locally each job gets GPUs of its own, and on Slurm the
sbatch command lines of stages 1, 3 and 4 carry the GPU, CPU, memory and time requests.

No GPU is needed: local jobs are given the GPU ids of a pretend CUDA_VISIBLE_DEVICES, and Slurm's
sbatch is replaced by a stand-in that records what it was asked for and reports every task done."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, copy_recipe, run

FAKE_SBATCH = f"""#!{sys.executable}
import os, re, shlex, sys
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["SBATCH_RECORD"], "a") as f:
    f.write(" ".join(argv) + "\\n")
script = Path(argv[-1]).read_text()
done = shlex.split(re.search(r'^done=(.*)$', script, re.M).group(1))[0]
spec = next(a for a in argv if a.startswith("--array=")).split("=")[1].split("%")[0]
first, _, last = spec.partition("-")
for i in range(int(first), int(last or first) + 1):
    Path(f"{{done}}.{{i}}").write_text("0")
print("4242")
"""


def test_local_jobs_get_gpus_of_their_own(tmp_path):
    # 6 jobs of one GPU each on 4 GPUs: never two running jobs on one GPU. Each job waits until 4 have
    # started (at most 20 s), so the first four surely run at once however slow the machine is.
    script = ("echo $CUDA_VISIBLE_DEVICES $(date +%s.%N); touch started.JOB; "
              "for t in $(seq 200); do [ $(ls started.* | wc -l) -ge 4 ] && break; sleep 0.1; done; "
              "sleep 0.2; date +%s.%N")
    proc = subprocess.run([str(REPO / "utils" / "run_local.sh"), "--gpu", "1", "--max_jobs_run", "6", "JOB=1:6",
                           "log/job.JOB.log", "bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert proc.returncode == 0, proc.stderr
    spans = []
    for i in range(1, 7):
        lines = [ln for ln in (tmp_path / "log" / f"job.{i}.log").read_text().splitlines() if not ln.startswith("#")]
        device, start = lines[0].split()
        spans.append((device, float(start), float(lines[1])))
    assert {d for d, _, _ in spans[:4]} == {"0", "1", "2", "3"}  # the first four run at once, one GPU each
    for a in range(6):
        for b in range(a + 1, 6):
            if spans[a][0] == spans[b][0]:
                assert spans[a][2] <= spans[b][1] or spans[b][2] <= spans[a][1], (spans[a], spans[b])

    # two GPUs per job (both jobs held until both run, as above: one that ended could pass its GPUs on),
    # and a job asking for more GPUs than there are is refused
    pair = ("touch paired.JOB; for t in $(seq 200); do [ $(ls paired.* | wc -l) -ge 2 ] && break; sleep 0.1; done; "
            "echo gpus=$CUDA_VISIBLE_DEVICES")
    subprocess.run([str(REPO / "utils" / "run_local.sh"), "--gpu", "2", "JOB=1:2", "log/pair.JOB.log", "bash", "-c",
                    pair], cwd=tmp_path, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert sorted(re.search(r"^gpus=(\S+)", (tmp_path / "log" / f"pair.{i}.log").read_text(), re.M).group(1)
                  for i in (1, 2)) == ["4,5", "6,7"]
    proc = subprocess.run([str(REPO / "utils" / "run_local.sh"), "--gpu", "1", "log/none.log", "true"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and "--gpu 1 per job, but 0 GPU(s) visible" in proc.stderr
    # --gpu 0 (a CPU run) hides the GPUs, so that no job lands on GPU 0 by default
    subprocess.run([str(REPO / "utils" / "run_local.sh"), "log/cpu.log", "bash", "-c", "echo gpus=[$CUDA_VISIBLE_DEVICES]"],
                   cwd=tmp_path, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert "\ngpus=[]\n" in (tmp_path / "log" / "cpu.log").read_text()


def submissions(record: Path, job: str) -> list[str]:
    """The recorded sbatch command lines of the job script ``<job>.sh``."""
    lines = record.read_text().splitlines() if record.exists() else []
    return [line for line in lines if Path(line.split()[-1]).name == f"{job}.sh"]


@pytest.mark.parametrize("ngpu", [0, 1, 2, 4])
def test_slurm_command_lines_of_stages_1_3_4_ask_for_the_gpus(tmp_path, ngpu):
    recipe = copy_recipe(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    record = tmp_path / "sbatch.txt"
    env = {"cmd_backend": "slurm", "SBATCH_RECORD": str(record), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    common = ("--ngpu", str(ngpu), "--nj", "3", "--mode", "regular", "--test_sets", "test")

    # stage 1 submits, then finds no features (the stand-in ran nothing): only the request matters here
    run(recipe, "--stage", "1", "--stop_stage", "1", *common, **env)
    stage1 = submissions(record, "dump")[0]
    run(recipe, "--stage", "3", "--stop_stage", "3", *common, **env)
    (stage3,) = submissions(record, "train")
    model = recipe / "exp" / "smollm2_135m_regular" / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "speechllm.yaml").write_text("{}\n")
    run(recipe, "--stage", "4", "--stop_stage", "4", *common, **env)
    (stage4,) = submissions(record, "decode")

    job_gpu = "--gres=gpu:1" if ngpu else None
    for line, gpus, cpus, mem in ((stage1, job_gpu, "2", "4G"), (stage4, job_gpu, "2", "8G"),
                                  (stage3, f"--gres=gpu:{ngpu}" if ngpu else None, str(4 * ngpu) if ngpu else None,
                                   "8G")):
        flags = line.split()
        assert ("--gres" in line) == bool(gpus) and (gpus is None or gpus in flags), line
        if cpus is not None:
            assert f"--cpus-per-task {cpus}" in line, line
        assert f"--mem-per-cpu {mem}" in line and "--time 24:00:00" in line, line
    assert "--array=1-3" in stage1 and "--array=1-3" in stage4 and "--array=1-1" in stage3
    train_script = (recipe / stage3.split()[-1]).read_text()
    assert f"--nproc_per_node {max(ngpu, 1)}" in train_script
    assert f"--device {'cuda' if ngpu else 'cpu'}" in train_script
