import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Tests compile many small programs once each: cheaper XLA CPU codegen (no LLVM optimisation, and the
# classic elemental emitters instead of the fusion emitters: 2-3x less compile time on the tiny models)
# leaves results within the tests' tolerances. Every test process sees 8 CPU devices, so the sharded
# tests run in-process (single-device code uses the first one). Set before jax is imported;
# subprocess tests set their own.
FAST_XLA = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
            "--xla_cpu_use_fusion_emitters=false")
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES} {FAST_XLA}".strip()
# libtpu is installed for the tests that compile for TPU slices (mgjax.topology); everything runs on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# JAX's persistent compilation cache in a folder of this run (removed at its end): tests build the same
# tiny programs through different code paths (a fresh jax.jit per train() call, per loaded model, per
# subprocess); each is compiled once per run. Workers and subprocesses inherit the folder. A run starts
# cold, so the first compile of every program is always paid.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mgjax-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

# TEST_PROFILE_JSON=FILE: per test, its wall time and the seconds JAX spent tracing, lowering and compiling
# (jax.monitoring events), written to FILE as JSON when the session ends (what the suite's time goes to).
if os.environ.get("TEST_PROFILE_JSON"):
    import json
    import time

    import jax
    import pytest

    _PROFILE: dict = {}
    _CURRENT = ["(collection)"]

    def _on_event(event: str, seconds: float, **_):
        row = _PROFILE.setdefault(_CURRENT[0], {"wall": 0.0})
        name = event.rsplit("/", 1)[-1]
        row[name] = row.get(name, 0.0) + seconds
        row[name + "_n"] = row.get(name + "_n", 0) + 1

    jax.monitoring.register_event_duration_secs_listener(_on_event)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _CURRENT[0] = item.nodeid
        t = time.perf_counter()
        yield
        _PROFILE.setdefault(item.nodeid, {"wall": 0.0})["wall"] += time.perf_counter() - t

    def pytest_sessionfinish(session):
        worker = os.environ.get("PYTEST_XDIST_WORKER")  # with -n, one file per worker
        Path(os.environ["TEST_PROFILE_JSON"] + (f".{worker}" if worker else "")).write_text(json.dumps(_PROFILE))
