"""`mgjax train` and `check-cluster` started as the launchers start them (MGJAX_* variables, gloo over a
loopback coordinator) join one job: two processes with 4 CPU devices each train as one process with 8 devices
(same losses, float32, relative error <= 1e-5); a lost process is named and the job resumes."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_XLA

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_cluster_with_environment_variables():
    """`mgjax check-cluster` as the launchers run it: two processes configured by MGJAX_* variables."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_XLA}",
               "JAX_PLATFORMS": "cpu", "MGJAX_COORDINATOR": f"127.0.0.1:{port}", "MGJAX_NUM_PROCESSES": "2",
               "MGJAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, "-m", "mgjax", "check-cluster"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    # Gloo's C++ threads log "[Gloo] Rank r is connected to ..." to the same stdout, sometimes split across
    # lines, so keep only the lines of our report.
    ours = [[line for line in o[0].splitlines() if "all-reduce" in line] for o in outs]
    assert ours[0] == ["2 processes, 4 devices (cpu); all-reduce over all devices: 4"]
    assert ours[1] == []  # only the main process prints


def _train_job(run_dir: Path, steps: int) -> list[subprocess.Popen]:
    """`mgjax train` started as the launchers start it on two hosts: MGJAX_* variables, one process each."""
    from test_train import SMALL

    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_XLA}",
               "JAX_PLATFORMS": "cpu", "MGJAX_COORDINATOR": f"127.0.0.1:{port}", "MGJAX_NUM_PROCESSES": "2",
               "MGJAX_PROCESS_ID": str(pid), "MGJAX_HEARTBEAT_TIMEOUT": "5"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mgjax", "train", str(CONFIGS / "demo" / "stage1.yaml"), f"run_dir={run_dir}",
             *SMALL, f"steps={steps}", "checkpoint_every=2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    return procs


def test_train_joins_the_job_names_a_lost_host_and_resumes(tmp_path):
    """Two `mgjax train` processes are one job: global rows, one writer of each file, the losses of one process
    with both hosts' devices (4 + 4: the batch split over 8 devices either way). When one is killed, the other
    ends within 120 s with one line naming it; the same command on both resumes from the last checkpoint and
    ends as an uninterrupted run would."""
    from mgjax.train.config import load_train_config
    from mgjax.train.loop import train
    from test_train import losses, small_run

    steps, run = 6, tmp_path / "job"
    procs = _train_job(run, steps)
    deadline = time.monotonic() + 400
    while not (run / "checkpoints" / "2").is_dir():
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=150)
    assert time.monotonic() - killed < 120 and procs[0].returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("mgjax train: error: process 1 of 2 stopped answering (no heartbeat for 5 s"), err[-3000:]
    assert "re-run the same command on every host" in last
    procs[1].communicate()

    procs = _train_job(run, steps)
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert all(o[0].strip().splitlines()[-1].startswith(f"step {steps}: checkpoints in {run}") for o in outs)
    assert "resumed" in outs[0][1]
    job = losses(run)
    assert [r["step"] for r in job] == list(range(1, steps + 1))  # one writer, no step twice
    assert {r["rows"] for r in job} == {16}  # global_batch: each host fed half of it
    one = tmp_path / "one"  # this process alone with its 8 devices, micro-batches accumulated
    train(load_train_config(CONFIGS / "demo" / "stage1.yaml", small_run(one, f"steps={steps}", "checkpoint_every=2")))
    for a, b in zip(job, losses(one)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX is loaded here, not in the `mgjax` supervisor
def test_a_lost_coordinator_is_one_line(capfd, monkeypatch):
    """A process of a job whose coordinator died is aborted by JAX's C++ runtime (checked by hand: SIGKILL to
    process 0 of `mgjax train`, the other aborts within a second); its supervisor turns the abort's report
    into one line and exit 1, and passes everything else through."""
    from mgjax.__main__ import supervise

    abort = ("import os, sys; print('step 3 ok', file=sys.stderr, flush=True); sys.stderr.buffer.write("
             "b'F1206 client.h:80] Terminating process because the JAX distributed service detected fatal errors. "
             "This most likely indicates that another task died\\n    @  0x7f01 abort\\n'); sys.stderr.flush(); "
             "os.abort()")
    monkeypatch.setenv("MGJAX_COORDINATOR", "10.0.0.1:12355")
    assert supervise([sys.executable, "-c", abort], "train") == 1
    err = capfd.readouterr().err
    assert err.splitlines() == ["step 3 ok", "mgjax train: error: lost the job's coordinator, process 0 "
                                "(10.0.0.1:12355); re-run the same command on every host to resume from the last "
                                "checkpoint (training) or the answers written (eval)"]
    assert supervise([sys.executable, "-c", "import sys; print('bad', file=sys.stderr); sys.exit(2)"], "eval") == 2
    assert capfd.readouterr().err == "bad\n"


def test_one_process_commands_say_so_inside_a_job(monkeypatch, capsys):
    from mgjax import jobenv
    from mgjax.cli import main

    monkeypatch.setenv("SLURM_NTASKS", "4")  # an sbatch script's own shell: one process of a 4-task allocation
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert not jobenv.in_job()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # a task that srun started with three others
    assert jobenv.in_job()
    assert main(["convert", "src", "out"]) == 2
    assert "convert runs on one process" in capsys.readouterr().err


def test_the_watchdog_is_gone_before_the_process_ends(monkeypatch):
    """`finish` stops the watchdog and waits for its question in flight: a daemon thread inside JAX's C++
    client when the interpreter exits aborts the process ("terminate called after throwing an instance of",
    exit 134; seen once in CI after a job that had finished)."""
    import threading

    import jax
    from jax._src import distributed as jax_distributed

    from mgjax.distributed import _Watchdog

    asking, answered = threading.Event(), []

    class Client:  # a coordinator that takes its time to answer
        def get_live_nodes(self, nodes):
            asking.set()
            time.sleep(0.5)
            answered.append(nodes)
            return nodes

    assert jax.process_count() == 1  # the backend starts before the client is faked: it would use it
    monkeypatch.setattr(jax_distributed.global_state, "client", Client())
    watchdog = _Watchdog(heartbeat_s=1)
    watchdog.start()
    assert asking.wait(10)
    watchdog.stop()
    assert not watchdog.is_alive() and answered == [[0]]
