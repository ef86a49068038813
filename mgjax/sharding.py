"""Logical axis names -> mesh axes: the only module that knows mesh axis names.

Modules annotate parameters with logical names (`nn.with_logical_partitioning`) and constrain large
activations with `constrain`; which mesh axis each logical name lands on is decided here alone.
Without an active mesh and rules, `constrain` is the identity, so single-device code runs unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# FSDP + tensor parallelism; a preset of [shard] builds on this table.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("expert", "expert"),
    ("layers", None),
    ("vis_embed", "fsdp"),
    ("vis_heads", "tensor"),
    ("vis_mlp", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's layout by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, names)
