"""ConvNeXt stochastic depth: off at inference (deterministic), an option in training."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax.vision.convnext import ConvNextTrunk
import tiny


def test_drop_path_only_when_not_deterministic():
    cfg = dataclasses.replace(tiny.CONVNEXT, drop_path_rate=0.5)
    trunk = ConvNextTrunk(cfg)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    params = nn.unbox(jax.jit(trunk.init)(jax.random.key(1), x))
    # gamma is 1e-6 at init: make the residual branches matter so that dropping them shows.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.ones_like(v) if p[-1].key == "gamma" else v, params)
    apply = jax.jit(lambda p, x, rng: trunk.apply(p, x, deterministic=rng is None,
                                                  rngs=None if rng is None else {"dropout": rng})[-1])
    det = apply(params, x, None)
    a = apply(params, x, jax.random.key(2))
    b = apply(params, x, jax.random.key(3))
    assert not np.allclose(a, det) and not np.allclose(a, b)
    # rate 0: training mode computes the deterministic function
    plain = ConvNextTrunk(tiny.CONVNEXT)  # drop_path_rate 0
    train = jax.jit(lambda p, x: plain.apply(p, x, deterministic=False,
                                             rngs={"dropout": jax.random.key(2)})[-1])(params, x)
    np.testing.assert_allclose(train, det, rtol=1e-6, atol=1e-6)
