"""Choosing the next token from logits: greedy, or temperature with top-k / top-p (nucleus) filtering."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
    """float32 logits [B, V] with everything outside the `top_k` largest (0 = all) and outside the smallest
    set whose probability reaches `top_p` (1.0 = all) set to -inf; top_k and top_p are one value for all rows
    or one per row ([B, 1]). The most likely token always stays, as in HF's `TopPLogitsWarper`
    (min_tokens_to_keep=1); ties with the k-th largest stay, as in HF's `TopKLogitsWarper`."""
    order = jnp.argsort(-logits, axis=-1)  # stable: tied logits keep their order
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.broadcast_to(jnp.reshape(jnp.asarray(top_k, jnp.int32), (-1, 1)), (logits.shape[0], 1))
    kth = jnp.take_along_axis(sorted_logits, jnp.clip(k - 1, 0, logits.shape[-1] - 1), axis=-1)
    # the dropped logits are the tail of the sorted order, so the order stays that of the kept ones
    sorted_logits = jnp.where((k == 0) | (sorted_logits >= kth), sorted_logits, -jnp.inf)
    logits = jnp.where((k == 0) | (logits >= kth), logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the tokens ranked above
    drop_sorted = (before >= top_p) & (jnp.arange(logits.shape[-1]) > 0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def next_token(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k, top_p: jax.Array,
               greedy: bool) -> jax.Array:
    """int32 [B]: argmax when `greedy` (static), else a sample of softmax(logits / temperature) after
    top-k / top-p filtering. `rng` is one key per row [B] so that a row's sample does not depend on the
    other rows of the batch."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
