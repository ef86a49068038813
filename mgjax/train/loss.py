"""The MGM training loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mgjax.config import IGNORE_INDEX


def next_token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of the cross-entropy of logits[:, :-1] against labels[:, 1:] over non-ignored labels,
    in float32. logits [B, L, V], labels int [B, L] with IGNORE_INDEX (-100) where nothing is supervised.
    Sums, not a mean, so that micro-batches and hosts add up to exactly the big batch's mean."""
    logits = logits[:, :-1].astype(jnp.float32)
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, nll, 0.0)), keep.sum()


def next_token_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the batch's supervised tokens (the original's per-batch average)."""
    total, count = next_token_nll(logits, labels)
    return total / jnp.maximum(count, 1)
