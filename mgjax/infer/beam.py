"""Beam search under one `jax.jit`, as HF transformers' `generate(num_beams=K, do_sample=False)` does it:
each step ranks the best (1 + stop tokens) x K continuations of the K live beams; those ending in a stop
token (among the best K) become finished hypotheses scored by summed log-probability / generated length
** length_penalty, the best K others live on; a row is done when it has K finished hypotheses none of
which its best live beam could still beat (early_stopping=False). At the budget's last token every
candidate finishes. The best finished hypothesis is the answer. The KV cache holds B x K rows, reordered
by each step's choice.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mgjax.infer.generate import prefill
from mgjax.model import MGM

NEG = -1e9  # a score no hypothesis reaches (not -inf: sums of it must stay finite)


def _beam_rows(cache, index: jax.Array):
    """The cache rows [B * K] picked by `index` [B * K] (the KVCache's batch axis is 4th from the end)."""
    return jax.tree.map(lambda x: jnp.take(x, index, axis=x.ndim - 4), cache)


def make_beam_search(module: MGM, length: int, max_new: int, *, num_beams: int, stop_ids: tuple[int, ...],
                     pad_id: int, length_penalty: float = 1.0, sample: bool = False) -> Callable:
    """run(params, input_ids [B, T], images, images_aux, attention_mask [B, T], rng, limit, temperature, top_p)
    -> (token ids int32 [B, max_new] of each row's best hypothesis, its stop token kept and pad after; None):
    the signature of `generate.make_generate`'s program. `limit` (traced) <= max_new.

    `sample` (static) is HF's beam sampling (`do_sample=True`, MMMU's protocol): log-probabilities divided
    by `temperature` (what the beams accumulate) and the candidates drawn without replacement from the
    softmax of the accumulated scores (the Gumbel top-k trick) instead of taken best first; `rng` seeds it,
    one key per row and step. Without `sample`, rng, temperature and top_p are unused."""
    k = num_beams

    def run(params, input_ids, images, images_aux, attention_mask, rng, limit, temperature, top_p):
        b = input_ids.shape[0]
        logits, cache, valid, position = prefill(module, params, input_ids, images, images_aux, attention_mask,
                                                 length, max_new)
        # every beam of a row starts as its prompt; only beam 0 may expand at the first step
        cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=x.ndim - 4), cache)
        valid, position, logits = (jnp.repeat(x, k, axis=0) for x in (valid, position, logits))
        stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
        vocab = logits.shape[-1]
        rows = jnp.arange(b)[:, None]
        keep = max(2, 1 + len(stop_ids)) * k  # enough candidates that K of them go on whatever stops
        row_keys = jax.random.split(rng, b)  # a row's draws do not depend on the other rows

        state = dict(
            seqs=jnp.full((b, k, max_new), pad_id, jnp.int32),
            scores=jnp.tile(jnp.asarray([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1)),  # summed log-probs
            done_seqs=jnp.full((b, k, max_new), pad_id, jnp.int32),
            done_scores=jnp.full((b, k), NEG, jnp.float32),  # normalised by length
            done=jnp.zeros((b,), bool), logits=logits, cache=cache, position=position, i=jnp.asarray(0))

        def cond(s):
            return (s["i"] < limit) & ~jnp.all(s["done"])

        def body(s):
            i = s["i"]
            logp = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1).reshape(b, k, vocab)
            if sample:
                logp = logp / temperature
            total = (s["scores"][..., None] + logp).reshape(b, k * vocab)
            if sample:  # `keep` draws without replacement from softmax(total), then best first
                keys = jax.vmap(lambda key: jax.random.fold_in(key, i))(row_keys)
                noisy = total + jax.vmap(lambda key: jax.random.gumbel(key, (k * vocab,)))(keys)
                flat = jax.lax.top_k(noisy, keep)[1]
                top = jnp.take_along_axis(total, flat, axis=1)
                top, order = jax.lax.top_k(top, keep)
                flat = jnp.take_along_axis(flat, order, axis=1)
            else:
                top, flat = jax.lax.top_k(total, keep)
            beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
            seqs = jnp.take_along_axis(s["seqs"], beam[..., None], axis=1).at[:, :, i].set(token)  # [B, keep, N]
            # at the budget's last token every candidate ends (HF's max-length criterion)
            is_stop = jnp.isin(token, stops) | (i + 1 >= limit)
            # finished: stop tokens among the K best candidates, for rows not done yet
            normalised = top / (i + 1.0) ** length_penalty
            new_done = jnp.where(is_stop & (jnp.arange(keep) < k) & ~s["done"][:, None], normalised, NEG)
            pool = jnp.concatenate([s["done_scores"], new_done], axis=1)
            pool_seqs = jnp.concatenate([s["done_seqs"], seqs], axis=1)
            done_scores, pick = jax.lax.top_k(pool, k)
            done_seqs = pool_seqs[rows, pick]
            # alive: the K best candidates that do not stop
            alive_scores, pick = jax.lax.top_k(jnp.where(is_stop, NEG, top), k)
            alive_seqs, alive_beam, alive_token = seqs[rows, pick], beam[rows, pick], token[rows, pick]
            # a row is done when K finished hypotheses all beat what its best live beam could still reach
            full = jnp.all(done_scores > NEG / 2, axis=1)
            reachable = alive_scores[:, 0] / (i + 1.0) ** length_penalty
            done = s["done"] | (full & (done_scores[:, -1] >= reachable))
            cache = _beam_rows(s["cache"], (rows * k + alive_beam).reshape(-1))
            logits, cache = module.apply({"params": params}, alive_token.reshape(-1), s["position"], valid, cache,
                                         length + i, method=MGM.decode)
            return dict(seqs=alive_seqs, scores=alive_scores, done_seqs=done_seqs, done_scores=done_scores,
                        done=done, logits=logits, cache=cache, position=s["position"] + 1, i=i + 1)

        s = jax.lax.while_loop(cond, body, state)
        return s["done_seqs"][:, 0], None  # the finished pool is sorted: its first is the best hypothesis

    return run
