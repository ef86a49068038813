"""ConvNeXt stochastic depth: off at inference (deterministic), an option in training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax.config import ConvNextConfig
from mgjax.vision.convnext import ConvNextTrunk


def test_drop_path_only_when_not_deterministic():
    cfg = ConvNextConfig(depths=(1, 1, 2, 1), dims=(4, 8, 12, 16), drop_path_rate=0.5)
    trunk = ConvNextTrunk(cfg)
    x = jax.random.normal(jax.random.key(0), (8, 64, 64, 3))
    params = nn.unbox(trunk.init(jax.random.key(1), x))
    # gamma is 1e-6 at init: make the residual branches matter so that dropping them shows.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.ones_like(v) if p[-1].key == "gamma" else v, params)
    det = trunk.apply(params, x)[-1]
    np.testing.assert_array_equal(det, trunk.apply(params, x, deterministic=True)[-1])
    a = trunk.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})[-1]
    b = trunk.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(3)})[-1]
    assert not np.allclose(a, det) and not np.allclose(a, b)
    # rate 0: training mode computes the deterministic function
    plain = ConvNextTrunk(ConvNextConfig(depths=(1, 1, 2, 1), dims=(4, 8, 12, 16), drop_path_rate=0.0))
    np.testing.assert_array_equal(plain.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})[-1],
                                  det)
