"""Batched generation under one `jax.jit`: prefill the prompts into a KV cache, then decode token by token
in a `lax.while_loop` (the cache is the loop's carry, updated in place) until every row has stopped or
the token budget is spent.

Prompts are left-padded (`MGM.prefill`), so every row's next token goes to the same cache slot while its
rotary position counts only its own tokens: a row gives what it gives alone. Rows that have stopped get
`pad_id` from then on.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mgjax.infer.sampling import next_token
from mgjax.lm.decoder import init_cache
from mgjax.model import MGM


def prefill(module: MGM, params, input_ids, images, images_aux, attention_mask, length: int, max_new: int,
            image_embeds=None):
    """The prompts (left-padded to `length`) written into a fresh cache with room for `max_new` tokens:
    (float32 logits [B, V] of each prompt's last token, the cache, valid bool [B, length + max_new] over its
    slots, each row's next rotary position int [B]). `image_embeds`: the images' `MGM.encode_images` output,
    given instead of the images (see `MGM.prefill`)."""
    b = input_ids.shape[0]
    cache = init_cache(module.config.lm, b, length + max_new, module.dtype)
    logits, cache, valid, position = module.apply({"params": params}, input_ids, images, images_aux, attention_mask,
                                                  length, cache, image_embeds, method=MGM.prefill)
    return logits, cache, jnp.concatenate([valid, jnp.ones((b, max_new), bool)], axis=1), position


def make_generate(module: MGM, length: int, max_new: int, *, greedy: bool, top_k: int, stop_ids: tuple[int, ...],
                  pad_id: int, with_scores: bool = False) -> Callable:
    """run(params, input_ids [B, T], images, images_aux, attention_mask [B, T], rng, limit, temperature, top_p)
    -> (token ids int32 [B, max_new], scores float32 [B, max_new, V] or None), for `jax.jit`.

    `length` (static) is the merged prompt length the prompts are left-padded to; `max_new` (static) the
    cache's room for new tokens; `limit` (traced) how many to generate (<= max_new), so one program serves
    every budget up to `max_new`. A row stops after emitting one of `stop_ids` (kept in its ids)."""

    def run(params, input_ids, images, images_aux, attention_mask, rng, limit, temperature, top_p):
        b = input_ids.shape[0]
        logits, cache, valid, position = prefill(module, params, input_ids, images, images_aux, attention_mask,
                                                 length, max_new)
        row_keys = jax.random.split(rng, b)  # a row's samples do not depend on the other rows
        stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
        vocab = logits.shape[-1]

        def choose(logits, i):
            keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys)
            return next_token(logits, keys, temperature, top_k, top_p, greedy)

        def record(carry, i, token, logits):
            out, scores, done = carry
            token = jnp.where(done, pad_id, token)
            out = out.at[:, i].set(token)
            if with_scores:
                scores = scores.at[:, i].set(logits)
            return out, scores, done | jnp.isin(token, stops)

        token = choose(logits, 0)
        out = jnp.full((b, max_new), pad_id, jnp.int32)
        scores = jnp.zeros((b, max_new, vocab), jnp.float32) if with_scores else None
        out, scores, done = record((out, scores, jnp.zeros((b,), bool)), 0, token, logits)

        def cond(carry):
            i, *_, done = carry
            return (i < limit) & ~jnp.all(done)

        def body(carry):
            i, token, position, cache, out, scores, done = carry
            logits, cache = module.apply({"params": params}, token, position, valid, cache, length + i - 1,
                                         method=MGM.decode)
            token = choose(logits, i)
            out, scores, done = record((out, scores, done), i, token, logits)
            return i + 1, jnp.where(done, pad_id, token), position + 1, cache, out, scores, done

        carry = (jnp.asarray(1), jnp.where(done, pad_id, token), position, cache, out, scores, done)
        _, _, _, _, out, scores, _ = jax.lax.while_loop(cond, body, carry)
        return out, scores

    return run
