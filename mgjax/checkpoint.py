"""Orbax checkpoints of parameter trees (the `orbax.checkpoint` v1 API, used everywhere in mgjax).

`save_streaming` writes a tree group by group with Orbax's partial save, so a converter never holds
more than one group in host memory; `restore` reads all of a tree or, with `partial=True`, the
leaves named by the abstract tree it is given.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterable

import jax
import orbax.checkpoint.experimental.v1 as ocp

from mgjax.errors import MGJaxError

# orbax.checkpoint._src.serialization.serialization._read_array_index_and_device_put's message
ABANDONED_READ = "Encountered error while reading array index"


def save_streaming(path: str | os.PathLike, groups: Iterable[dict]) -> None:
    """Writes the union of the (disjoint) trees in `groups` as one checkpoint at `path`.

    Leaves become jax arrays with `jax.device_put` (one copy of a NumPy leaf; `jnp.asarray` makes
    two), which Orbax writes without staging another. After each save the group, its NumPy sources
    and the freed heap are released, so the next group does not stack on top of them.
    """
    path = Path(path)
    if path.exists():
        raise MGJaxError(f"{path} already exists; remove it or choose another output folder")
    groups = iter(groups)
    try:
        with saving_context():
            # Not a for loop: its variable would keep the last group alive while the next one is built.
            while (group := next(groups, None)) is not None:
                group = jax.device_put(group)
                ocp.partial.save(path, group)
                del group
                gc.collect()  # jax.device_put leaves its NumPy source in a reference cycle until a collection
                _trim_heap()
            ocp.partial.finalize(path)
    except BaseException:
        _join_writers()
        raise


def _join_writers(timeout: float = 60) -> None:
    """Waits for the writer threads a failed Orbax save leaves running: it raises at the first failed write
    (its futures are awaited in order) while the others go on, and one finishing later (the `_sharding`
    file) would recreate a folder the caller has removed (`mgjax_ckpt.atomic_output`, on a full disk)."""
    for t in threading.enumerate():
        if type(t).__module__.startswith("orbax."):
            threading.Thread.join(t, timeout)  # not the subclass's join, which raises the thread's error again


def _trim_heap() -> None:
    """Hands freed heap back to the OS: glibc otherwise keeps tensorstore's per-chunk write buffers
    in its arenas (about 2 GB more RSS while the next group is built)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def saved_shapes(path: str | os.PathLike) -> dict:
    """The saved tree as ShapeDtypeStructs (no data read)."""
    try:
        meta = ocp.pytree_metadata(Path(path)).metadata
    except Exception as e:  # Orbax raises several types for missing or damaged checkpoints
        raise MGJaxError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from None
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)


def placed(abstract: Any) -> Any:
    """`abstract` with every leaf that has no sharding placed on the first device (Orbax needs one)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: a if getattr(a, "sharding", None) is not None else
                        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def saving_context() -> ocp.Context:
    """The Orbax context of every mgjax save. Replica-parallel saving (the replicas of a replicated shard each
    write a part of it) slices each such shard with a program compiled for its shape: worth it for large
    shards only; below 1 MiB a part (norms, biases, a tiny model's every leaf) one replica writes it whole."""
    ctx = ocp.Context()
    ctx.array.saving.min_slice_bytes_for_replica_parallel = 1 << 20
    return ctx


def loading_context(partial: bool) -> ocp.Context:
    """An Orbax context that reads only the leaves asked for when `partial`."""
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = partial
    return ctx


def restore(path: str | os.PathLike, abstract: dict, partial: bool = False) -> dict:
    """Reads the leaves of `abstract` (ShapeDtypeStructs; without a sharding a leaf lands on the first
    device) from `path`."""
    try:
        with loading_context(partial):
            out = ocp.load_pytree(Path(path), placed(abstract))
    except Exception as e:
        quiet_abandoned_reads()
        raise MGJaxError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "it may be incomplete or from another model") from None
    return check_restored(path, out)


def quiet_abandoned_reads() -> None:
    """Orbax reads a checkpoint's arrays concurrently; when one read fails, the others are abandoned, and each
    raises again when its coroutine is finalised, later, which Python prints with the array's whole TensorStore
    spec (600 tracebacks, 27,000 lines on stderr for the demo's state). From the first failed load on, those
    reports are dropped (the warning said what failed); every other unraisable exception is reported as before."""
    report = sys.unraisablehook
    if getattr(report, "mgjax_quiet", False):
        return

    def hook(unraisable) -> None:
        if not str(unraisable.exc_value).startswith(ABANDONED_READ):
            report(unraisable)

    hook.mgjax_quiet = True
    sys.unraisablehook = hook


def check_restored(path: str | os.PathLike, tree: Any) -> Any:
    """`tree` as restored, after checking that every leaf was read: a partial restore leaves what the checkpoint
    lacks as the ShapeDtypeStruct it was asked for, silently."""
    missing = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MGJaxError(f"{path}: the checkpoint has no {missing[0]}{more}; it is from another model or incomplete")
    return tree
