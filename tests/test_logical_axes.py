"""Every parameter carries logical axis names that the one rule table knows, and no rule maps two
dimensions of one parameter to the same mesh axis (which would be an invalid PartitionSpec)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mgjax.model import MGM
from mgjax.sharding import DEFAULT_RULES, MESH_AXES
import tiny

@pytest.mark.parametrize("kind", list(tiny.LMS))
def test_every_parameter_has_known_logical_axes(kind):
    module = MGM(tiny.mgm(kind))
    ids = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, jnp.zeros((1, 56, 56, 3)),
                                               jnp.zeros((1, 64, 64, 3)), ids, length=1))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    rules = dict(DEFAULT_RULES)
    assert all(a in MESH_AXES for v in rules.values() if v for a in ((v,) if isinstance(v, str) else v))
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, name
        mesh_axes = []
        for n in leaf.names:
            assert n is None or n in rules, f"{name}: logical axis {n!r} is not in the rule table"
            v = rules.get(n) if n else None
            mesh_axes += [v] if isinstance(v, str) else list(v or ())
        assert len(mesh_axes) == len(set(mesh_axes)), f"{name}: {leaf.names} map to {mesh_axes}"
