"""The MGM training loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mgjax.config import IGNORE_INDEX


def token_nll(logits: jax.Array, labels: jax.Array,
              segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:] in float32, per position [B, L - 1] (0 where
    ignored), and the bool mask [B, L - 1] of the kept targets. logits [B, L, V]; labels int [B, L] with
    IGNORE_INDEX (-100) where nothing is supervised; `segments` int [B, L] (packed rows,
    `SplicePlan.segments`): a target in another segment than the token that predicts it (a sample's
    first token after the previous sample's last) is ignored."""
    logits = logits[:, :-1].astype(jnp.float32)
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    if segments is not None:
        keep = keep & (segments[:, 1:] == segments[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(keep, nll, 0.0), keep


def next_token_nll(logits: jax.Array, labels: jax.Array,
                   segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of `token_nll` over the kept targets. Sums, not a mean, so that micro-batches and hosts
    add up to exactly the big batch's mean."""
    nll, keep = token_nll(logits, labels, segments)
    return jnp.sum(nll), keep.sum()


def next_token_loss(logits: jax.Array, labels: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over the batch's supervised tokens (the original's per-batch average)."""
    total, count = next_token_nll(logits, labels, segments)
    return total / jnp.maximum(count, 1)
