"""A run's checkpoints: `{run_dir}/checkpoints/{step}/` written by Orbax's training Checkpointer.

Each holds `state` (step, trainable parameters, optimizer state), `frozen` (the other parameters) and
`data` (the input iterator's JSON state), so a resumed run continues bitwise. Orbax writes a step into a
temporary folder and renames it when complete: a run killed mid-save leaves no step that looks complete.
A step that is complete but unreadable (a damaged disk, a file removed by hand) is skipped with a
warning in favour of the one before it.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint.experimental.v1 as ocp

from mgjax.checkpoint import loading_context, placed
from mgjax.errors import MGJaxError

log = logging.getLogger(__name__)


class RunCheckpoints:
    """Saves every `every` steps (asynchronously) keeping the latest `keep`; restores the latest readable."""

    def __init__(self, directory: str | os.PathLike, every: int, keep: int):
        self.directory = Path(directory)
        policies = ocp.training
        self._ckpt = ocp.training.Checkpointer(
            self.directory, save_decision_policy=policies.save_decision_policies.FixedIntervalPolicy(every),
            preservation_policy=policies.preservation_policies.LatestN(keep), cleanup_tmp_directories=True)

    def steps(self) -> list[int]:
        return sorted(int(c.step) for c in self._ckpt.checkpoints)

    def save(self, step: int, state: Any, frozen: Any, data: dict, force: bool = False) -> bool:
        """Starts saving `step` when the interval (or `force`) says so; returns whether it did."""
        # overwrite: a resumed run replaces the unreadable steps it skipped
        return self._ckpt.save_checkpointables_async(step, {"state": state, "frozen": frozen, "data": data},
                                                     force=force, overwrite=True) is not None

    def restore_latest(self, abstract_state: Any, abstract_frozen: Any) -> tuple[int, Any, Any, dict] | None:
        """(step, state, frozen, data state) of the newest readable checkpoint, or None when there is none.
        `abstract_*` are trees of ShapeDtypeStructs with shardings: each process reads only its shards."""
        if not self.steps():
            return None
        step, out = self.load_latest({"state": abstract_state, "frozen": abstract_frozen, "data": None},
                                     partial=False)
        return step, out["state"], out["frozen"], out["data"]

    def load_latest(self, abstract: dict, partial: bool = True) -> tuple[int, dict]:
        """(step, the leaves of `abstract`) from the newest readable checkpoint; an unreadable one is skipped
        with a warning. Leaves without a sharding land on the first device."""
        for step in reversed(self.steps()):
            try:
                return step, self.load(step, abstract, partial)
            except Exception as e:  # Orbax raises many types for damaged checkpoints
                log.warning("checkpoint %s is unreadable (%s: %s); trying the one before it",
                            self.directory / str(step), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        raise MGJaxError(f"{self.directory}: no checkpoint could be read (steps {self.steps()}); move the folder "
                         "away to start afresh")

    def load(self, step: int, abstract: dict, partial: bool = True) -> dict:
        """The leaves of `abstract` ({"state": ..., "frozen": ..., "data": None}, any part) at `step`."""
        with loading_context(partial):
            return self._ckpt.load_checkpointables(step, placed(abstract))

    def wait(self) -> None:
        self._ckpt.wait()

    def close(self) -> None:
        self._ckpt.close()



RUN_FORMAT = "mgjax-run"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A `run_dir` of `mgjax train` (its mgjax_config.json says so)."""
    try:
        return json.loads((Path(path) / "mgjax_config.json").read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError):
        return False


def _parts(run_dir: Path, abstract: dict) -> dict:
    """The checkpointables holding the parameters of `abstract`: trainable ones under state/params, the
    others under frozen. Orbax cannot load a checkpointable into an empty tree: only non-empty parts."""
    from mgjax.train.step import split_params

    trainable = json.loads((run_dir / "mgjax_config.json").read_text())["trainable"]
    a_train, a_frozen = split_params(abstract, trainable)
    return {k: v for k, v in (("state", {"params": a_train}), ("frozen", a_frozen)) if jax.tree.leaves(v)}


def _params(out: dict) -> dict:
    from mgjax.train.step import merge_params

    return merge_params(out.get("state", {}).get("params", {}), out.get("frozen", {}))


def restore_run_params(run_dir: str | os.PathLike, abstract: dict) -> tuple[int, dict]:
    """(step, parameters) of a run's newest readable checkpoint: the leaves of `abstract` (ShapeDtypeStructs,
    with shardings or not; any subset of the model's parameters), from its trainable and frozen parts."""
    ckpts = RunCheckpoints(Path(run_dir) / "checkpoints", 1, 1 << 30)
    try:
        step, out = ckpts.load_latest(_parts(Path(run_dir), abstract))
    finally:
        ckpts.close()
    return step, _params(out)


@contextmanager
def run_param_reader(run_dir: str | os.PathLike) -> Iterator[tuple[int, Callable[[dict], dict]]]:
    """(step, read): `read(abstract)` returns those parameters (any subset) of the run's newest complete
    checkpoint, so that a caller can go through a big model a few parameters at a time."""
    run_dir = Path(run_dir)
    ckpts = RunCheckpoints(run_dir / "checkpoints", 1, 1 << 30)
    try:
        if not ckpts.steps():
            raise MGJaxError(f"{run_dir}: the run has no complete checkpoint yet")
        step = ckpts.steps()[-1]

        def read(abstract: dict) -> dict:
            try:
                return _params(ckpts.load(step, _parts(run_dir, abstract)))
            except Exception as e:  # Orbax raises many types for damaged checkpoints
                raise MGJaxError(f"{ckpts.directory / str(step)} is unreadable ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); move that step folder away to "
                                 "use the one before it") from None
        yield step, read
    finally:
        ckpts.close()
