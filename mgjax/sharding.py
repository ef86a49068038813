"""Meshes and logical axis rules: the only module that knows mesh axis names.

Modules annotate parameters with logical names (`nn.with_logical_partitioning`) and constrain large
activations with `constrain`; which mesh axis each logical name lands on is decided by one rule
table here. Changing a parallelism layout changes only the table. Without an active mesh and rules,
`constrain` is the identity, so single-device code runs unchanged.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mgjax.config import MeshConfig
from mgjax.errors import MGJaxError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # every axis that does not split a weight's math splits the batch

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_ACTIVATIONS: Rules = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", None),
    ("cache_batch", BATCH_AXES),
    ("cache_len", None),
    ("cache_heads", "tensor"),
)
# Weights. The ConvNeXt tower (`conv_*`) stays replicated: it is small (0.2B), frozen, and its
# channel counts (192 ... 1536) do not divide large FSDP axes.
_FSDP: Rules = (("embed", "fsdp"), ("vis_embed", "fsdp"), ("conv_in", None), ("conv_out", None))
_TENSOR: Rules = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
                  ("vis_heads", "tensor"), ("vis_mlp", "tensor"))
_OTHER: Rules = (("head_dim", None), ("layers", None))


def _replicated(rules: Rules) -> Rules:
    return tuple((name, None) for name, _ in rules)


RULE_PRESETS: dict[str, Rules] = {
    # pure data parallelism: weights replicated, the batch split over every axis
    "dp": _ACTIVATIONS + _replicated(_FSDP + _TENSOR) + (("expert", None),) + _OTHER,
    "fsdp": _ACTIVATIONS + _FSDP + _replicated(_TENSOR) + (("expert", None),) + _OTHER,
    "fsdp_tp": _ACTIVATIONS + _FSDP + _TENSOR + (("expert", None),) + _OTHER,
    # + Mixtral's experts over the `expert` axis
    "fsdp_tp_ep": _ACTIVATIONS + _FSDP + _TENSOR + (("expert", "expert"),) + _OTHER,
}
DEFAULT_RULES = RULE_PRESETS["fsdp_tp_ep"]


def rules_for(preset: str) -> Rules:
    try:
        return RULE_PRESETS[preset]
    except KeyError:
        raise MGJaxError(f"no sharding rule preset {preset!r}; known: {', '.join(RULE_PRESETS)}") from None


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert), Auto axis types (linen's logical constraints)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(config: MeshConfig, num_devices: int) -> jax.sharding.AbstractMesh:
    """A device-less mesh of `num_devices` for planning shardings and memory without the hardware."""
    return jax.sharding.AbstractMesh(config.resolve(num_devices), MESH_AXES,
                                     axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh, axis: str) -> int:
    """Size of a mesh axis; an axis the mesh does not have counts as 1."""
    return dict(mesh.shape).get(axis, 1)


def batch_shards(mesh) -> int:
    """How many ways the batch is split: the product of the batch axes the mesh has."""
    return math.prod(axis_size(mesh, a) for a in BATCH_AXES)


def mesh_rules(mesh, rules: Rules = DEFAULT_RULES) -> Rules:
    """`rules` for `mesh`: a mesh may carry any subset of the four axes (e.g. ("fsdp",) or
    ("data", "fsdp")); rules naming an axis it lacks drop that axis (size 1). Any other axis name is
    an error: the rule table could never place anything on it."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise MGJaxError(f"mesh axis {unknown[0]!r} is not an mgjax axis; name mesh axes from {', '.join(MESH_AXES)} "
                         "(a subset is fine: missing axes count as size 1)")
    out = []
    for name, axes in rules:
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.axis_names)
        out.append((name, kept[0] if len(kept) == 1 else kept or None))
    return tuple(out)


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("mgjax_platform", default=None)


def target_platform() -> str:
    """The platform the program being traced is built for: the active mesh's devices' (a TPU slice compiled for
    from a CPU host is "tpu"), else JAX's default backend."""
    return _PLATFORM.get() or jax.default_backend()


@contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """The context under which jitted model code sees the mesh, the rule table and the mesh's platform."""
    token = _PLATFORM.set(mesh.devices.flat[0].platform)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules(mesh, rules)):
            yield
    finally:
        _PLATFORM.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's layout by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, names)


def _mesh_axes(names: Sequence[str | None], rules: Rules) -> list[tuple[str, ...]]:
    spec = nn.logical_to_mesh_axes(names, rules)
    out = []
    for a in tuple(spec) + (None,) * (len(names) - len(spec)):
        out.append(() if a is None else (a,) if isinstance(a, str) else tuple(a))
    return out


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


# Logical dimensions replicated, rather than refused, when they do not divide their mesh axes: KV heads
# fewer than the tensor axis (MGM-2B's single KV head; MaxText does the same). Each device then holds
# every KV head of its layer: the planner counts those bytes.
REPLICATE_IF_INDIVISIBLE = ("kv_heads",)


def param_shardings(boxed: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of boxed (logically partitioned) parameters or their abstract
    values, after checking that every sharded dimension divides its mesh axes."""
    rules = mesh_rules(mesh, rules)

    def one(path, leaf):
        names, shape = leaf.names, leaf.value.shape
        spec = []
        for d, axes in enumerate(_mesh_axes(names, rules)):
            n = math.prod(axis_size(mesh, a) for a in axes)
            if shape[d] % n and names[d] in REPLICATE_IF_INDIVISIBLE:
                axes = ()
            elif shape[d] % n:
                raise MGJaxError(f"parameter {_path(path)} {tuple(shape)}: dimension {d} ('{names[d]}', size "
                                 f"{shape[d]}) does not divide over mesh axes {axes} ({n} devices); choose a mesh "
                                 f"whose {'x'.join(axes)} size divides {shape[d]}, or a rule preset that does not "
                                 f"shard '{names[d]}'")
            spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree_util.tree_map_with_path(one, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array [B, ...]: the batch axis split like `act_batch`."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), mesh_rules(mesh, rules)))


def bytes_per_device(abstract: Any, shardings: Any, itemsize: int | None = None) -> int:
    """Bytes each device holds of a tree of ShapeDtypeStructs laid out by `shardings`, at the
    leaves' dtypes or at `itemsize` bytes per element."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shard = s.shard_shape(a.shape)
        total += int(np.prod(shard)) * (itemsize or np.dtype(a.dtype).itemsize)
    return total
