"""The launchers, run against stand-ins for gcloud / scontrol / srun that record what they are asked."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parent.parent / "launch"


def _tool(bin_dir: Path, name: str, body: str):
    p = bin_dir / name
    p.write_text("#!/usr/bin/env bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def test_tpu_pod_script_runs_the_whole_lifecycle(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    # describe fails (no slice yet); every other call succeeds and is recorded
    _tool(bin_dir, "gcloud", f'echo "$*" | tr "\\n" " " >> {calls}; echo >> {calls}\n'
                             '[[ "$4" == describe ]] && exit 1\nexit 0\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "--name", "t", "--zone", "z", "--type", "v5p-128", "--reuse",
                          "--", "mgjax", "check-cluster"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    log = calls.read_text().splitlines()
    verbs = [line.split()[3] for line in log]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "scp", "delete"], log
    assert "--accelerator-type=v5p-128" in log[1]
    assert all("--worker=all" in line for line in log[2:6])
    assert "mgjax check-cluster" in log[4] and "export MGJAX_JOIN=1" in log[4] and "pip install" in log[3]


def test_tpu_pod_script_usage():
    out = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "--name", "t"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_slurm_script_sets_the_coordinator(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun: run the task once, as task 1 of 2
    _tool(bin_dir, "srun", 'shift\nSLURM_PROCID=1 "$@"\n')
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    mine = {k: v for k, v in os.environ.items() if not k.startswith("MGJAX_")}  # only what the script sets
    env = {**mine, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "mgjax", "SLURM_JOB_ID": "7"}
    out = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "env"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("MGJAX_"))
    assert got == {"MGJAX_COORDINATOR": "node-a:12355", "MGJAX_NUM_PROCESSES": "2", "MGJAX_PROCESS_ID": "1"}


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


def test_slurm_script_restarts_a_failed_job(tmp_path):
    """--restarts N: a run that fails (a lost host: exit 1) is started again and logged; exit 2 is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "scontrol", 'printf "node-a\\n"\n')
    runs = tmp_path / "runs"
    # srun: fails with exit 1 on its first call, then runs the task
    _tool(bin_dir, "srun", f'echo run >> {runs}\n[[ $(wc -l < {runs}) -eq 1 ]] && exit 1\nshift\nSLURM_PROCID=0 "$@"\n')
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-a",
           "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mgjax", "SLURM_JOB_ID": "8"}
    script = str(LAUNCH / "slurm_gpu.sbatch")
    out = subprocess.run(["bash", script, "--restarts", "2", "echo", "done"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    assert runs.read_text().count("run") == 2 and "exit status 1: restart 1 of 2" in out.stderr
    assert "restart 1 of 2" in (tmp_path / "logs" / "mgjax-8" / "restarts.log").read_text()
    runs.unlink()
    out = subprocess.run(["bash", script, "--restarts", "2", "bash", "-c", "exit 2"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and runs.read_text().count("run") == 2  # the failed run, then exit 2: no retry


def test_tpu_pod_script_restarts_a_failed_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runs = tmp_path / "runs"
    # the command's ssh (the second) fails once with exit 1, then succeeds
    _tool(bin_dir, "gcloud", f'[[ "$4" == describe ]] && exit 1\n'
                             f'if [[ "$4" == ssh && "$*" == *check-cluster* ]]; then echo run >> {runs}; '
                             f'[[ $(wc -l < {runs}) -eq 1 ]] && exit 1; fi\nexit 0\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "--name", "t", "--zone", "z", "--type", "v5p-8", "--restarts",
                          "3", "--", "mgjax", "check-cluster"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert runs.read_text().count("run") == 2 and "exit status 1: restart 1 of 3" in out.stderr
    assert (tmp_path / "logs" / "t" / "restarts.log").is_file()
