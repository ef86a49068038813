"""Every parameter carries logical axis names that the one rule table knows, and no rule maps two
dimensions of one parameter to the same mesh axis (which would be an invalid PartitionSpec)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mgjax.config import CLIPConfig, ConvNextConfig, LMConfig, MGMConfig
from mgjax.model import MGM
from mgjax.sharding import DEFAULT_RULES, MESH_AXES

TOWERS = dict(vision=CLIPConfig(32, 64, 3, 4, 56, 14), vision_aux=ConvNextConfig((1, 1, 2, 1), (4, 8, 12, 16)),
              mm_hidden_size=32, mm_hidden_size_aux=40, image_size_aux=128)
LMS = {
    "llama": LMConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=48),
    "gemma": LMConfig(family="gemma", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1,
                      head_dim=16, intermediate_size=48, activation="gelu_tanh", tie_word_embeddings=True,
                      scale_embeddings=True),
    "mixtral": LMConfig(family="mixtral", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        head_dim=8, intermediate_size=48, num_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("family", list(LMS))
def test_every_parameter_has_known_logical_axes(family):
    module = MGM(MGMConfig(lm=LMS[family], **TOWERS))
    ids = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, jnp.zeros((1, 56, 56, 3)),
                                               jnp.zeros((1, 128, 128, 3)), ids, length=1))["params"]
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
