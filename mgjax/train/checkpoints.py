"""A run's checkpoints: `{run_dir}/checkpoints/{step}/` written by Orbax's training Checkpointer, and
`{run_dir}/frozen/`, the parameters that do not train, written once (they never change: stage 1's frozen
LLM and towers would otherwise be rewritten at every checkpoint).

Each step holds `state` (step, trainable parameters, optimizer state) and `data` (the input iterator's
JSON state), so a resumed run continues bitwise. Orbax writes a step (and `frozen`) into a temporary
folder and renames it when complete: a run killed mid-save leaves no step that looks complete. A step
that is torn all the same (a copy cut short, a damaged disk, a file removed by hand: no commit marker,
metadata that does not parse, an array file cut short) is skipped with a warning in favour of the one
before it. Orbax deletes the steps beyond `keep` only once a newer step is committed, so a save that
fails (a full disk: `DiskFull`, one line) leaves the previous step whole for the re-run to resume from.
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

from mgjax.checkpoint import check_restored, loading_context, placed, quiet_abandoned_reads, restore, saving_context
from mgjax.errors import MGJaxError, causes, stop_when_full

log = logging.getLogger(__name__)

# What Orbax writes into a step folder once everything else is in it, just before the rename that commits it;
# a local folder is listed by its name alone, so a torn copy (a sync cut short) is only told by these.
COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"  # JSON; "commit_timestamp_nsecs" is added at the commit


class RunCheckpoints:
    """Saves every `every` steps (asynchronously) keeping the latest `keep`; restores the latest readable."""

    def __init__(self, directory: str | os.PathLike, every: int, keep: int):
        self.directory = Path(directory)
        policies = ocp.training
        self._ckpt = ocp.training.Checkpointer(
            self.directory, save_decision_policy=policies.save_decision_policies.FixedIntervalPolicy(every),
            preservation_policy=policies.preservation_policies.LatestN(keep), cleanup_tmp_directories=True,
            context=saving_context())
        self._good: int | None = None  # the newest step known whole: the one resumed from, or the last saved
        self._saving: tuple[int, int] | None = None  # (step, bytes this process writes) of the save under way

    def steps(self) -> list[int]:
        return sorted(int(c.step) for c in self._ckpt.checkpoints)

    def save(self, step: int, state: Any, data: dict, force: bool = False) -> bool:
        """Starts saving `step` when the interval (or `force`) says so; returns whether it did."""
        if not (force or self._ckpt.should_save(step)):
            return False
        self.wait()  # Orbax would wait too; here a failure of the previous save is reported as that step's
        self._saving = (step, _local_bytes(state))
        with self._stop_when_full(*self._saving):
            return self._ckpt.save_checkpointables_async(step, {"state": state, "data": data}, force=True) is not None

    def _stop_when_full(self, step: int, nbytes: int):
        """A save that runs out of space stops the run with one line (`DiskFull`): the step, its size, and the
        step that stays whole to resume from."""
        then = ("free space and run the same command to resume from step "
                f"{self._good}, which is whole" if self._good is not None else
                "there is no checkpoint yet: free space and run the same command")
        return stop_when_full(self.directory / str(step), lambda: nbytes, then)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data state) of the newest readable checkpoint, or None when there is none.
        `abstract_state` is a tree of ShapeDtypeStructs with shardings: each process reads only its shards.
        The torn steps after it are deleted: the run takes over from it, and Orbax would count them as its
        newest steps (no save up to their numbers, and a place among the `keep` latest)."""
        if not self.steps():
            return None
        step, out = self.load_latest({"state": abstract_state, "data": None}, partial=False)
        for torn in [s for s in self.steps() if s > step]:
            log.warning("deleting the torn checkpoint %s: the run goes on from step %d", self.directory / str(torn),
                        step)
            self._ckpt.delete(torn)
        self._good = step
        return step, out["state"], out["data"]

    def load_latest(self, abstract: dict, partial: bool = True) -> tuple[int, dict]:
        """(step, the leaves of `abstract`) from the newest readable checkpoint; an unreadable one is skipped
        with a warning. Leaves without a sharding land on the first device."""
        for step in reversed(self.steps()):
            try:
                return step, self.load(step, abstract, partial)
            except Exception as e:  # Orbax raises many types for damaged checkpoints
                log.warning("checkpoint %s is unreadable (%s); trying the one before it", self.directory / str(step),
                            _reason(e))
        raise MGJaxError(f"{self.directory}: no checkpoint could be read (steps {self.steps()}); move the folder "
                         "away to start afresh")

    def load(self, step: int, abstract: dict, partial: bool = True) -> dict:
        """The leaves of `abstract` ({"state": ..., "frozen": ..., "data": None}, any part) at `step`."""
        _check_committed(self.directory / str(step))
        try:
            with loading_context(partial):
                out = self._ckpt.load_checkpointables(step, placed(abstract))
        except Exception:
            quiet_abandoned_reads()
            raise
        return check_restored(self.directory / str(step), out)

    def wait(self) -> None:
        saving, self._saving = self._saving, None
        if saving is None:
            return self._ckpt.wait()
        with self._stop_when_full(*saving):
            self._ckpt.wait()
        self._good = saving[0]

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._ckpt.close()


def _check_committed(path: Path) -> None:
    """Raises unless the step folder `path` carries the marks of a commit (`COMMIT_MARKER`, `STEP_METADATA`)."""
    if not (path / COMMIT_MARKER).is_file():
        raise MGJaxError(f"no {COMMIT_MARKER}: the step was never committed")
    try:
        json.loads((path / STEP_METADATA).read_text())["commit_timestamp_nsecs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MGJaxError(f"{STEP_METADATA} does not record a commit ({type(e).__name__}: {e})") from None


def _reason(e: Exception, limit: int = 300) -> str:
    """Why a step could not be read, in a line: the innermost exception (Orbax wraps the one that says what is
    wrong in others that dump its handler registry), its first line, at most `limit` characters."""
    *_, e = causes(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:limit]}{'...' if len(first) > limit else ''}"


def _local_bytes(tree: Any) -> int:
    """What this process writes of `tree`: each array's shards on its devices, one copy of each (Orbax writes
    replica 0 only)."""
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) if isinstance(a, jax.Array)
               for s in a.addressable_shards if s.replica_id == 0)



RUN_FORMAT = "mgjax-run"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A `run_dir` of `mgjax train` (its mgjax_config.json says so)."""
    try:
        return json.loads((Path(path) / "mgjax_config.json").read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError):
        return False


FROZEN = "frozen"


def has_frozen(run_dir: Path) -> bool:
    return (Path(run_dir) / FROZEN).is_dir()


def save_frozen(run_dir: Path, frozen: dict) -> None:
    """Writes the run's frozen parameters, replacing any earlier ones (an empty tree writes nothing)."""
    if jax.tree.leaves(frozen):
        path = Path(run_dir) / FROZEN
        with stop_when_full(path, lambda: _local_bytes(frozen), "free space and run the same command: it writes "
                            "them again"), saving_context():
            ocp.save(path, frozen, overwrite=True)


def load_frozen(run_dir: Path, abstract: dict) -> dict:
    """The leaves of `abstract` (any subset of the frozen parameters) from `{run_dir}/frozen`."""
    if not jax.tree.leaves(abstract):
        return {}
    if not has_frozen(run_dir):
        raise MGJaxError(f"{run_dir}: no {FROZEN}/ folder (the parameters that do not train); re-run the training "
                         "command, which rebuilds it from the run's model config")
    return restore(Path(run_dir) / FROZEN, abstract, partial=True)


def _split(run_dir: Path, abstract: dict) -> tuple[dict, dict]:
    """`abstract` split into (trainable, frozen) by the run's trainable prefixes."""
    from mgjax.train.step import split_params

    return split_params(abstract, json.loads((run_dir / "mgjax_config.json").read_text())["trainable"])


def _state_part(a_train: dict) -> dict:
    """The checkpointables to ask a step for: Orbax cannot load one into an empty tree."""
    return {"state": {"params": a_train}} if jax.tree.leaves(a_train) else {}


def restore_run_params(run_dir: str | os.PathLike, abstract: dict) -> tuple[int, dict]:
    """(step, parameters) of a run's newest readable checkpoint: the leaves of `abstract` (ShapeDtypeStructs,
    with shardings or not; any subset of the model's parameters), trainable ones from the step, the others
    from `frozen/`."""
    from mgjax.train.step import merge_params

    run_dir = Path(run_dir)
    a_train, a_frozen = _split(run_dir, abstract)
    ckpts = RunCheckpoints(run_dir / "checkpoints", 1, 1 << 30)
    try:
        if not ckpts.steps():
            raise MGJaxError(f"{run_dir}: the run has no complete checkpoint yet")
        step, out = ckpts.load_latest(_state_part(a_train)) if jax.tree.leaves(a_train) else (ckpts.steps()[-1], {})
    finally:
        ckpts.close()
    return step, merge_params(out.get("state", {}).get("params", {}), load_frozen(run_dir, a_frozen))


@contextmanager
def run_param_reader(run_dir: str | os.PathLike) -> Iterator[tuple[int, Callable[[dict], dict]]]:
    """(step, read): `read(abstract)` returns those parameters (any subset) of the run's newest complete
    checkpoint, so that a caller can go through a big model a few parameters at a time."""
    from mgjax.train.step import merge_params

    run_dir = Path(run_dir)
    ckpts = RunCheckpoints(run_dir / "checkpoints", 1, 1 << 30)
    try:
        if not ckpts.steps():
            raise MGJaxError(f"{run_dir}: the run has no complete checkpoint yet")
        step = ckpts.steps()[-1]

        def read(abstract: dict) -> dict:
            a_train, a_frozen = _split(run_dir, abstract)
            try:
                state = ckpts.load(step, _state_part(a_train)) if jax.tree.leaves(a_train) else {}
            except Exception as e:  # Orbax raises many types for damaged checkpoints
                raise MGJaxError(f"{ckpts.directory / str(step)} is unreadable ({_reason(e)}); move that step "
                                 "folder away to use the one before it") from None
            return merge_params(state.get("state", {}).get("params", {}), load_frozen(run_dir, a_frozen))
        yield step, read
    finally:
        ckpts.close()
