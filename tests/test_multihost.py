"""Two processes with 4 CPU devices each (gloo, loopback coordinator) run the training step of one
process with 8 devices: same losses (float32, relative error <= 1e-5)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).parent / "multihost_worker.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc, devices, tmp_path):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).parent)}
    out = tmp_path / f"{nproc}.json"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(pid), str(nproc), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(nproc)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    return json.loads(out.read_text())


def test_two_processes_equal_one(tmp_path):
    one = _run(1, 8, tmp_path)
    two = _run(2, 4, tmp_path)
    assert (one["processes"], two["processes"]) == (1, 2)
    for k in ("loss", "loss2"):
        assert abs(two[k] - one[k]) <= 1e-5 * abs(one[k]), (k, one, two)
    assert one["loss2"] < one["loss"]  # the step did something
