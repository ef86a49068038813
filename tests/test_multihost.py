"""Two processes with 4 CPU devices each (gloo, loopback coordinator) run the training step of one
process with 8 devices: same losses (float32, relative error <= 1e-5)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import FAST_XLA

WORKER = Path(__file__).parent / "multihost_worker.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc, devices, tmp_path):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_XLA}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parent)}
    out = tmp_path / f"{nproc}.json"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(pid), str(nproc), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(nproc)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    return json.loads(out.read_text())


def test_two_processes_equal_one(tmp_path):
    from multihost_worker import train_two_steps

    one = train_two_steps(0, 1)  # this process: 8 devices (tests/conftest.py)
    two = _run(2, 4, tmp_path)
    assert (one["processes"], two["processes"]) == (1, 2)
    for k in ("loss", "loss2"):
        assert abs(two[k] - one[k]) <= 1e-5 * abs(one[k]), (k, one, two)
    assert one["loss2"] < one["loss"]  # the step did something


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
