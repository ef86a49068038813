"""Whether this process was started as one of a multi-process job, read from what the launchers set. No JAX
here: the `mgjax` command asks before it imports anything heavy (`mgjax.__main__` supervises such a process,
`mgjax.cli.main` joins it; `mgjax.distributed` does the joining)."""

from __future__ import annotations

import os

ENV = ("MGJAX_COORDINATOR", "MGJAX_NUM_PROCESSES", "MGJAX_PROCESS_ID")  # launch/slurm_gpu.sbatch
JOIN_ENV = "MGJAX_JOIN"  # set by launch/tpu_pod.sh: JAX finds a TPU pod's hosts by itself, but only if asked
# Set in each task of a launch of several by srun (an sbatch script's own shell has SLURM_NTASKS for the
# whole allocation, yet is one process) and by Open MPI's mpirun; JAX detects those clusters by itself.
TASKS_ENV = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


def in_job() -> bool:
    """Whether this process was started as one of several: MGJAX_* set, MGJAX_JOIN, or an srun / mpirun
    launch of more than one task."""
    return (any(k in os.environ for k in (*ENV, JOIN_ENV))
            or any(os.environ.get(k, "1").strip() not in ("", "1") for k in TASKS_ENV))
