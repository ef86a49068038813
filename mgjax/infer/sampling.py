"""Choosing the next token from logits: greedy, or temperature with top-k / top-p (nucleus) filtering."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
    """float32 logits [B, V] with everything outside the `top_k` largest (static; 0 = all) and outside the
    smallest set whose probability reaches `top_p` (1.0 = all) set to -inf. The most likely token always
    stays, as in HF's `TopPLogitsWarper` (min_tokens_to_keep=1)."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the tokens ranked above
    drop_sorted = (before >= top_p) & (jnp.arange(logits.shape[-1]) > 0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def next_token(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array,
               greedy: bool) -> jax.Array:
    """int32 [B]: argmax when `greedy` (static), else a sample of softmax(logits / temperature) after
    top-k / top-p filtering. `rng` is one key per row [B] so that a row's sample does not depend on the
    other rows of the batch."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
