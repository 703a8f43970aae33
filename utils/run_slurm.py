#!/usr/bin/env python3
"""Slurm job backend with ESPnet's queue interface:

    run_slurm.py [--config conf/slurm.conf] [--gpu N] [--mem M] [--num_threads T] [--time T]
                 [--num_nodes M] [--max_jobs_run K] [JOB=1:N] exp/log/name.JOB.log command args...

"JOB" (a whole word) in the log name and the command becomes the array index: one ``sbatch --array`` job runs
every index, at most K at once. The options become sbatch flags through the config file (ESPnet's
``conf/slurm.conf`` format, which users edit for their partitions):

    command sbatch --export=ALL        the submit command and flags given to every job
    default time=24:00:00              value used when the option is not given
    option time=* --time $0            any value: $0 is the value
    option gpu=0                       this exact value: no flag (an exact line wins over "*")

The backend waits for the array. When any index fails (non-zero exit, or killed by Slurm before
it could report), it names the index and its log, and exits 1. Ctrl-C cancels the jobs.

Jobs may outlive the time limit. Each task gets ``JOB_END_TIME`` (its end as Unix seconds, from
squeue) and ``JOB_RESUME_FLAG`` (a path). A task that stops early to be continued (stage 3 training
checkpoints before the end) creates the flag file; the backend then submits that index again, at
most ``--max_resubmits`` times (default 20), appending to the same log.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

OPTIONS = ("gpu", "mem", "num_threads", "time", "num_nodes", "max_jobs_run", "max_resubmits", "config")
MAX_RESUBMITS = 20
POLL_S = 1.0
SQUEUE_EVERY = 5  # polls between two squeue calls


class ConfigError(ValueError):
    pass


@dataclass
class SlurmConfig:
    command: list[str] = field(default_factory=lambda: ["sbatch", "--export=ALL"])
    defaults: dict[str, str] = field(default_factory=dict)
    exact: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    wildcard: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> SlurmConfig:
        cfg = cls()
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, _, rest = line.partition(" ")
            words = shlex.split(rest)
            if kind == "command" and words:
                cfg.command = words
            elif kind in ("default", "option") and words and re.fullmatch(r"\w+=\S+", words[0]):
                key, value = words[0].split("=", 1)
                if kind == "default":
                    cfg.defaults[key] = value
                elif value == "*":
                    cfg.wildcard[key] = words[1:]
                else:
                    cfg.exact[(key, value)] = words[1:]
            else:
                raise ConfigError(f"{path}:{n}: expected 'command ...', 'default key=value' or "
                                  f"'option key=value|* flags...', got {raw!r}")
        return cfg

    def flags(self, options: dict[str, str], config_path: Path) -> list[str]:
        """The sbatch flags of the given options (defaults filled in)."""
        out: list[str] = []
        for key, value in {**self.defaults, **options}.items():
            if (key, value) in self.exact:
                out += self.exact[(key, value)]
            elif key in self.wildcard:
                out += [w.replace("$0", value) for w in self.wildcard[key]]
            else:
                raise ConfigError(f"{config_path}: no 'option {key}=...' line for --{key} {value}")
        return out


def parse_args(argv: list[str]) -> tuple[dict[str, str], tuple[str, int, int] | None, str, list[str]]:
    options: dict[str, str] = {}
    while argv and argv[0].startswith("--"):
        key = argv[0][2:]
        if key not in OPTIONS or len(argv) < 2:
            sys.exit(f"{sys.argv[0]}: unknown option or missing value: {argv[0]} (known: {', '.join(OPTIONS)})")
        options[key] = argv[1]
        argv = argv[2:]
    array = None
    if argv and (m := re.fullmatch(r"([A-Za-z_]\w*)=(\d+):(\d+)", argv[0])):
        array = (m.group(1), int(m.group(2)), int(m.group(3)))
        argv = argv[1:]
    if len(argv) < 2:
        sys.exit(__doc__)
    return options, array, argv[0], argv[1:]


def job_script(cwd: Path, tasks: dict[int, tuple[str, str]], done: str, num_threads: str | None) -> str:
    """A bash script that runs task ``$SLURM_ARRAY_TASK_ID`` into its log and records its exit status
    (``resume`` when the task asked to be run again)."""
    branches = "\n".join(f"  {i}) log={shlex.quote(log)}; cmd={shlex.quote(cmd)} ;;" for i, (log, cmd) in tasks.items())
    threads = f"export OMP_NUM_THREADS={num_threads} MKL_NUM_THREADS={num_threads}\n" if num_threads else ""
    return f"""#!/usr/bin/env bash
cd {shlex.quote(str(cwd))}
done={shlex.quote(done)}
i=${{SLURM_ARRAY_TASK_ID:-1}}
case $i in
{branches}
  *) echo "no task $i" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$log")"
export JOB_RESUME_FLAG="$done.$i.resume"
rm -f "$JOB_RESUME_FLAG"
# this task's end (not the array's: its first task may carry the array's own id); none if unknown
task_id=${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}${{SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}
end=$(squeue -h -j "$task_id" -o %e 2>/dev/null | head -n 1)
unset JOB_END_TIME
if [[ "$end" =~ ^[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}T ]] && JOB_END_TIME=$(date -d "$end" +%s 2>/dev/null); then
  export JOB_END_TIME
fi
part=$(cat "$done.$i.part" 2>/dev/null || echo 1)
[ "$part" -eq 1 ] && echo "# $cmd" > "$log"
echo "# Started at $(date) on $(hostname) (Slurm job ${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}_$i, part $part," \
  "ends ${{end:-?}})" >> "$log"
[ -n "${{JOB_END_TIME:-}}" ] || echo "# No end time from squeue for $task_id: no stop before the time limit" >> "$log"
start=$SECONDS
( {threads}eval "$cmd" ) >> "$log" 2>&1
rc=$?
echo "# Accounting: time=$((SECONDS - start)) s, exit status $rc" >> "$log"
if [ -f "$JOB_RESUME_FLAG" ]; then
  echo "# Stopped early to continue in another job (part $((part + 1)))" >> "$log"
  rc=resume
fi
echo "# Ended at $(date)" >> "$log"
echo $rc > "$done.$i"
[ $rc = resume ] && exit 0 || exit $rc
"""


def in_queue(job_id: str) -> bool:
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


RESUME = "resume"  # the status of a task that stopped early to be run again


def wait(job_id: str, indices: list[int], done: str) -> dict[int, int | str | None]:
    """Exit status (or RESUME) of each index once all have reported or the job left the queue (None: no report)."""
    status: dict[int, int | str | None] = {}

    def collect() -> None:
        for i in indices:
            if i not in status and os.path.exists(f"{done}.{i}"):
                text = Path(f"{done}.{i}").read_text().strip()
                status[i] = RESUME if text == RESUME else int(text or 1)

    polls = 0
    while True:
        collect()
        if len(status) == len(indices):
            return status
        polls += 1
        if polls % SQUEUE_EVERY == 0 and not in_queue(job_id):
            time.sleep(2 * POLL_S)  # a status file written just before the job left the queue
            collect()
            return {i: status.get(i) for i in indices}
        time.sleep(POLL_S)


def submit_parts(submit_base: list[str], script: Path, tasks: dict[int, tuple[str, str]], qdir: Path, name: str,
                 done: str, first: int, last: int, max_jobs_run: str | None,
                 max_resubmits: int) -> tuple[dict[int, int | str | None], str]:
    """Submit the array, wait, and submit again the tasks that stopped early to continue (each time
    as part N+1 of the same log). Returns every task's final status and the last job id."""
    status: dict[int, int | str | None] = {}
    pending = list(tasks)
    for part in range(1, max_resubmits + 2):
        spec = f"{first}-{last}" if part == 1 else ",".join(map(str, pending))
        array_spec = spec + (f"%{max_jobs_run}" if max_jobs_run else "")
        submit = [*submit_base, "--parsable", f"--array={array_spec}", f"--output={qdir.resolve()}/{name}.%a.out",
                  *(["--open-mode=append"] if part > 1 else []), str(script)]
        proc = subprocess.run(submit, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{sys.argv[0]}: submission failed ({shlex.join(submit)}):\n{proc.stderr.strip()}")
        job_id = proc.stdout.strip().split(";")[0]
        print(f"{sys.argv[0]}: submitted Slurm job {job_id} ({len(pending)} task(s)"
              f"{f', part {part}' if part > 1 else ''}): {shlex.join(submit)}", file=sys.stderr)
        try:
            status.update(wait(job_id, pending, done))
        except KeyboardInterrupt:
            subprocess.run(["scancel", job_id])
            print(f"{sys.argv[0]}: interrupted; cancelled Slurm job {job_id}", file=sys.stderr)
            raise
        finally:
            for i in pending:
                for leftover in (f"{done}.{i}", f"{done}.{i}.resume"):
                    Path(leftover).unlink(missing_ok=True)
        pending = [i for i in pending if status[i] == RESUME]
        if not pending or part == max_resubmits + 1:
            break
        for i in pending:
            Path(f"{done}.{i}.part").write_text(str(part + 1))
        print(f"{sys.argv[0]}: task(s) {', '.join(map(str, pending))} stopped before the time limit to continue: "
              f"submitting them again", file=sys.stderr)
    return status, job_id


def main(argv: list[str]) -> int:
    options, array, log, command = parse_args(argv)
    config_path = Path(options.pop("config", "conf/slurm.conf"))
    if not config_path.is_file():
        sys.exit(f"{sys.argv[0]}: Slurm config {config_path} not found (see egs/*/sf1/conf/slurm.conf)")
    try:
        cfg = SlurmConfig.read(config_path)
    except ConfigError as e:
        sys.exit(f"{sys.argv[0]}: {e}")
    max_jobs_run = options.pop("max_jobs_run", None)
    max_resubmits = int(options.pop("max_resubmits", MAX_RESUBMITS))
    var, first, last = array or ("", 1, 1)
    cmd = shlex.join(command)
    # whole words only: "JOB" in dump.JOB.log is the index, in $SLURM_JOB_ID it is not
    sub = (lambda text, i: re.sub(rf"\b{var}\b", str(i), text)) if var else (lambda text, i: text)  # noqa: E731
    tasks = {i: (sub(log, i), sub(cmd, i)) for i in range(first, last + 1)}

    name = re.sub(rf"\.{var}\b|\.log$", "", Path(log).name) if var else Path(log).stem
    qdir = Path(log).parent / "q"
    qdir.mkdir(parents=True, exist_ok=True)
    done = str((qdir / f"{name}.{os.getpid()}.done").resolve())
    script = qdir / f"{name}.sh"
    script.write_text(job_script(Path.cwd(), tasks, done, options.get("num_threads")), encoding="utf-8")
    if "name" in cfg.wildcard:
        options = {"name": name, **options}
    try:
        flags = cfg.flags(options, config_path)
    except ConfigError as e:
        sys.exit(f"{sys.argv[0]}: {e}")
    try:
        status, job_id = submit_parts(cfg.command + flags, script, tasks, qdir, name, done, first, last,
                                      max_jobs_run, max_resubmits)
    except KeyboardInterrupt:
        return 130
    finally:
        for i in tasks:
            Path(f"{done}.{i}.part").unlink(missing_ok=True)
    failed = {i: rc for i, rc in status.items() if rc != 0}
    if failed:
        print(f"{sys.argv[0]}: {len(failed)} of {len(tasks)} task(s) of Slurm job {job_id} failed:", file=sys.stderr)
        for i, rc in failed.items():
            why = (f"exit status {rc}" if isinstance(rc, int) else
                   f"still unfinished after {max_resubmits} resubmissions" if rc == RESUME else
                   "no exit status (killed by Slurm: time or memory limit?)")
            where = f"{var}={i}: " if var else ""
            print(f"  {where}{why}, see {tasks[i][0]} and {qdir}/{name}.{i}.out", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
