"""The MGM training loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mgjax.config import IGNORE_INDEX


def next_token_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits[:, :-1] against labels[:, 1:] over non-ignored labels, in float32.

    logits [B, L, V], labels int [B, L] with IGNORE_INDEX (-100) where nothing is supervised; the
    mean is over the whole batch's supervised tokens (the original's per-batch average).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(keep.sum(), 1)
