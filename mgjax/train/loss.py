"""The MGM training loss."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mgjax.config import IGNORE_INDEX


def shifted_targets(labels: jax.Array, segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """What positions 0 .. L - 2 predict: (targets int [B, L - 1], 0 where ignored; keep bool [B, L - 1]).
    labels int [B, L] with IGNORE_INDEX (-100) where nothing is supervised; `segments` int [B, L] (packed
    rows, `SplicePlan.segments`): a target in another segment than the token that predicts it (a sample's
    first token after the previous sample's last) is ignored."""
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    if segments is not None:
        keep = keep & (segments[:, 1:] == segments[:, :-1])
    return jnp.where(keep, labels, 0), keep


def _nll(logits: jax.Array, targets: jax.Array, keep: jax.Array) -> jax.Array:
    """float32 -log p(target) = logsumexp(logits) - logits[target], [...] of logits [..., V] (0 where not
    `keep`). No [..., V] log-probabilities are written (log_softmax's cost 22% more on a CPU, forward and
    backward, at 1536 x 32000)."""
    logits = logits.astype(jnp.float32)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.where(keep, jax.nn.logsumexp(logits, axis=-1) - target, 0.0)


def token_nll(logits: jax.Array, labels: jax.Array,
              segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:] in float32, per position [B, L - 1] (0 where
    ignored), and the bool mask [B, L - 1] of the kept targets (see `shifted_targets`). logits [B, L, V]."""
    targets, keep = shifted_targets(labels, segments)
    # The last position predicts nothing: its target is padded and dropped, rather than slicing logits[:, :-1]
    # (a copy of [B, L, V] forward, and a padded copy of its gradient backward).
    pad = ((0, 0), (0, 1))
    return _nll(logits, jnp.pad(targets, pad), jnp.pad(keep, pad))[:, :-1], keep


def next_token_nll(logits: jax.Array, labels: jax.Array,
                   segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of `token_nll` over the kept targets. Sums, not a mean, so that micro-batches and hosts
    add up to exactly the big batch's mean."""
    nll, keep = token_nll(logits, labels, segments)
    return jnp.sum(nll), keep.sum()


def chunked_next_token_nll(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                           segments: jax.Array | None, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`next_token_nll` of the logits `head(hidden)` without materialising them: hidden [B, L, D] runs
    through `head` ([B, c, D] -> float32 [B, c, V]) `chunk` positions at a time under `jax.checkpoint`, so
    that at most one chunk's logits (and their gradient) exist at once, forward or backward."""
    targets, keep = shifted_targets(labels, segments)
    hidden = hidden[:, :-1]
    pad = -hidden.shape[1] % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, keep_padded = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, keep))

    def chunks(a):  # [B, n * c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(a.reshape(a.shape[0], -1, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(total, xs):
        h, t, k = xs
        return total + jnp.sum(_nll(head(h), t, k)), None

    total, _ = jax.lax.scan(one, jnp.float32(0), (chunks(hidden), chunks(targets), chunks(keep_padded)))
    return total, keep.sum()


def next_token_loss(logits: jax.Array, labels: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over the batch's supervised tokens (the original's per-batch average)."""
    total, count = next_token_nll(logits, labels, segments)
    return total / jnp.maximum(count, 1)
