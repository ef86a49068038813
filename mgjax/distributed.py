"""Multi-process (multi-host) setup, per-host input feeding, and once-only output.

One process per host. `initialize()` must run before anything touches a device.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from mgjax.errors import MGJaxError
from mgjax.sharding import DEFAULT_RULES, Rules, batch_sharding

ENV = ("MGJAX_COORDINATOR", "MGJAX_NUM_PROCESSES", "MGJAX_PROCESS_ID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to the job.

    Explicit arguments win, then the environment (MGJAX_COORDINATOR=host:port, MGJAX_NUM_PROCESSES,
    MGJAX_PROCESS_ID), then JAX's own detection (TPU pods, SLURM, Open MPI). A job of one process
    needs no call (and this call is then a no-op). CPU processes use gloo collectives.
    """
    coordinator_address = coordinator_address or os.environ.get("MGJAX_COORDINATOR")
    if num_processes is None and "MGJAX_NUM_PROCESSES" in os.environ:
        num_processes = _env_int("MGJAX_NUM_PROCESSES", 1)
    if process_id is None and "MGJAX_PROCESS_ID" in os.environ:
        process_id = _env_int("MGJAX_PROCESS_ID", 0)
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise MGJaxError("multi-process setup needs all of coordinator address, process count and process id "
                         f"(arguments or {', '.join(ENV)}); got only some")
    if all(given):
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise MGJaxError(f"coordinator address {coordinator_address!r} (MGJAX_COORDINATOR) must be HOST:PORT")
        if not 0 <= process_id < num_processes:
            raise MGJaxError(f"process id {process_id} (MGJAX_PROCESS_ID) must be in 0..{num_processes - 1} "
                             f"for {num_processes} processes (MGJAX_NUM_PROCESSES)")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        try:
            jax.distributed.initialize()  # TPU / SLURM / MPI auto-detection
        except ValueError as e:
            if "coordinator_address" not in str(e):
                raise
            # no cluster environment found: this is a single-process job


def _env_int(name: str, minimum: int) -> int:
    text = os.environ[name]
    if not text.strip().isdigit() or int(text) < minimum:
        raise MGJaxError(f"{name}={text!r} is not an integer >= {minimum}")
    return int(text)


def is_main_process() -> bool:
    """True on the one process that prints and writes files."""
    return jax.process_index() == 0


def main_print(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """Each process's rows -> global arrays split over the batch axes of `mesh`.

    Process p passes rows [p * n, (p + 1) * n) of the global batch (n rows per process); the
    global batch is n x process count rows.
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules), np.asarray(v))
            for k, v in local.items()}
