"""Multi-process (multi-host) setup, per-host input feeding, and once-only output.

One process per host. `initialize()` must run before anything touches a device; the `mgjax` command calls it
for every command that computes when the process was started as one of several (`jobenv.in_job`).

A process that dies (SIGKILL, a lost host) stops sending heartbeats; after `MGJAX_HEARTBEAT_TIMEOUT`
seconds (default 60) every other process ends with exit 1 and one line naming it (`_Watchdog`), instead of
waiting in a collective for ever (NCCL) or aborting with a C++ stack trace that names nobody (JAX's default
reaction). The loss of process 0, which hosts the coordination service, still aborts the others from C++ at
once: `mgjax.__main__.supervise` turns that into the one line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from mgjax import interrupt
from mgjax.errors import MGJaxError
from mgjax.jobenv import ENV
from mgjax.sharding import DEFAULT_RULES, Rules, batch_sharding

HEARTBEAT_ENV = "MGJAX_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_S = 60


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
    heartbeat = _env_int(HEARTBEAT_ENV, 1) if HEARTBEAT_ENV in os.environ else DEFAULT_HEARTBEAT_S
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Recoverable: the coordination service does not abort every process when one is lost (a C++ fatal error
    # and a stack trace that names nobody); the watchdog reports it instead.
    jax.config.update("jax_enable_recoverability", True)
    try:
        if all(given):
            jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                       heartbeat_timeout_seconds=heartbeat)
        else:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)  # TPU / SLURM / MPI auto-detection
    except ValueError as e:
        if all(given) or "coordinator_address" not in str(e):
            raise
        return  # no cluster environment found: this is a single-process job
    if jax.process_count() > 1:
        global _watchdog
        _watchdog = _Watchdog(heartbeat)
        _watchdog.start()


def _env_int(name: str, minimum: int) -> int:
    text = os.environ[name]
    if not text.strip().isdigit() or int(text) < minimum:
        raise MGJaxError(f"{name}={text!r} is not an integer >= {minimum}")
    return int(text)


def failed(code: int, unexpected: bool) -> None:
    """Ends a process of a multi-process job that failed (exit `code`) at once: JAX's clean shutdown would
    wait for the others at a barrier, and they notice this process is gone only once it stops beating. An
    `unexpected` error may be a collective that failed because a peer died (Gloo raises at once): first give
    the watchdog a heartbeat's time to name the lost process."""
    if unexpected and _watchdog is not None:
        time.sleep(_watchdog.heartbeat_s + 10)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def finish() -> None:
    """Ends a job's process in step with the others (JAX has no shutdown barrier for recoverable processes):
    all meet at a barrier, then the others disconnect before process 0, whose coordination service they use
    until then (a process that loses it aborts)."""
    if _watchdog is None:
        return
    from jax._src import distributed as jax_distributed

    client, n = jax_distributed.global_state.client, jax.process_count()
    # Process 0 may finish long after the others (generate answers on it alone): no timeout of its own, the
    # watchdog still names a process lost meanwhile.
    client.wait_at_barrier("mgjax: done", 7 * 24 * 3600 * 1000)
    _watchdog.stop()  # from here on a process that disconnects has finished, not died
    if jax.process_index() == 0:
        deadline = time.monotonic() + _watchdog.heartbeat_s * 2
        while len(client.get_live_nodes(list(range(n)))) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    jax.distributed.shutdown()


def joined() -> bool:
    """Whether this process is one of a job of several (`initialize` joined it)."""
    return _watchdog is not None


class _Watchdog(threading.Thread):
    """Asks the coordination service every few seconds which processes are alive (every process asks; one
    that has sent no heartbeat for `heartbeat_s` is not); when one is missing, prints one line naming it and
    ends this process with exit 1. The main thread may be waiting in a collective that never returns."""

    def __init__(self, heartbeat_s: int):
        super().__init__(name="mgjax-watchdog", daemon=True)
        self.heartbeat_s = heartbeat_s
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Ends the watchdog and waits for it. A daemon thread still inside a call of JAX's C++ client when the
        interpreter exits aborts the process on its way back ("terminate called after throwing an instance
        of ...": the forced unwind of the thread's exit meets the binding's catch-all), so it must be gone
        before the process ends; its last question takes milliseconds unless the coordinator hangs."""
        self._stopping.set()
        self.join(timeout=self.heartbeat_s)

    def run(self):
        from jax._src import distributed as jax_distributed  # the client JAX's own live_devices asks

        client, n, me = jax_distributed.global_state.client, jax.process_count(), jax.process_index()
        while not self._stopping.wait(min(5.0, self.heartbeat_s / 4)):
            try:
                live = client.get_live_nodes(list(range(n)))
            except Exception as e:  # the coordinator (process 0) itself is gone
                if self._stopping.is_set():
                    return
                lost(f"lost the job's coordinator, process 0 ({type(e).__name__}: {str(e).splitlines()[0]})")
            if self._stopping.is_set():
                return
            gone = sorted(set(range(n)) - set(live))
            if gone:
                lost(f"process {', '.join(map(str, gone))} of {n} stopped answering (no heartbeat for "
                     f"{self.heartbeat_s} s: {HEARTBEAT_ENV}); this is process {me}")


def lost(what: str) -> None:
    """Ends a process of a job that lost a member: one line, exit 1, no clean-up (a clean JAX shutdown would
    wait for the lost process at a barrier). What was committed (checkpoints, answer lines) stays."""
    sys.stdout.flush()
    print(f"mgjax {interrupt.command_name(sys.argv[1:])}: error: {what}; re-run the same command on every host "
          "to resume from the last checkpoint (training) or the answers written (eval)", file=sys.stderr, flush=True)
    os._exit(1)


_watchdog: _Watchdog | None = None


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
