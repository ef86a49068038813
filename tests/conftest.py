import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Tests compile many small programs once each: cheaper XLA CPU codegen halves the suite's time and
# leaves results within the tests' tolerances. Every test process sees 8 CPU devices, so the sharded
# tests run in-process (single-device code uses the first one). Set before jax is imported;
# subprocess tests set their own.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES} {FAST_XLA}".strip()
