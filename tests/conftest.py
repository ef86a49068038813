import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests compile many small programs once each: cheaper XLA CPU codegen halves the suite's time and
# leaves results within the tests' tolerances. Set before jax is imported; subprocess tests add theirs.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}".strip()


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """Results of tests/sharded_worker.py: one subprocess with 8 fake CPU devices, shared by
    test_sharding.py and test_multihost.py (its compiles dominate; run once)."""
    out = tmp_path_factory.mktemp("sharded") / "results.json"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_XLA}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "sharded_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
