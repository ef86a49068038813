"""The jitted training step: a pure function of (state, frozen parameters, micro-batches)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mgjax.lora import is_adapter
from mgjax.model import MGM, splice_labels
from mgjax.train.loss import chunked_next_token_nll, next_token_nll


class TrainState(NamedTuple):
    step: jax.Array  # optimizer steps done
    params: Any  # the trainable parameters only (float32 master weights)
    opt_state: Any  # for `params` only: frozen parameters carry no optimizer state


def has_prefix(path: Sequence[str], prefixes: Sequence[str]) -> bool:
    return "/".join(path).startswith(tuple(prefixes))


def is_trainable(path: Sequence[str], prefixes: Sequence[str]) -> bool:
    """LoRA adapters always train; anything else when its path starts with one of `prefixes`."""
    return is_adapter(path) or has_prefix(path, prefixes)


def split_params(params: dict, prefixes: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen): LoRA adapters and the parameters whose path ("llm/layers/...") starts with one of
    `prefixes`, and the rest."""
    flat = traverse_util.flatten_dict(params)
    pick = {p: is_trainable(p, prefixes) for p in flat}
    return (traverse_util.unflatten_dict({p: v for p, v in flat.items() if pick[p]}),
            traverse_util.unflatten_dict({p: v for p, v in flat.items() if not pick[p]}))


def merge_params(a: dict, b: dict) -> dict:
    """The union of two disjoint parameter trees."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)})


def batch_nll(module: MGM, params: dict, batch: dict, length: int,
              rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed next-token loss, supervised tokens) of one batch: input_ids, attention_mask, labels
    [B, T]; images, images_aux [N, ...]; optional segment_ids [B, T] (packed rows). `length` is the
    static merged length. With `rng`, the ConvNeXt tower's stochastic depth is on, as in the original
    (its Trainer puts the frozen tower in training mode too). With the LLM's `loss_chunk`, the head and
    cross-entropy run over chunks of positions (`chunked_next_token_nll`)."""
    chunk = module.config.lm.loss_chunk
    out, plan = module.apply({"params": params}, batch["input_ids"], batch["images"], batch["images_aux"],
                             batch["attention_mask"], length=length, deterministic=rng is None,
                             segment_ids=batch.get("segment_ids"), hidden_only=bool(chunk),
                             rngs=None if rng is None else {"dropout": rng})
    labels = splice_labels(plan, batch["labels"])
    if not chunk:
        return next_token_nll(out, labels, plan.segments)

    def head(hidden):
        return module.apply({"params": params}, hidden, method=MGM.head)

    return chunked_next_token_nll(head, out, labels, plan.segments, chunk)


def loss_fn(module: MGM, params: dict, batch: dict, length: int) -> jax.Array:
    """Mean next-token loss of one batch (see `batch_nll`), deterministic."""
    total, count = batch_nll(module, params, batch, length)
    return total / jnp.maximum(count, 1)


def make_train_step(module: MGM, tx: optax.GradientTransformation, length: int, rng: jax.Array | None = None):
    """step(state, frozen, micro_batches) -> (state, metrics), for `jax.jit`.

    `rng` (a key) turns on the tower's stochastic depth, folded with the step and micro-batch index so
    that a resumed run draws the same masks.

    `micro_batches` stacks k micro-batches on a leading axis ([k, B, T], [k, N, ...]); their gradients
    are summed by a scan and divided by the supervised tokens of all k, so k micro-batches give exactly
    the gradient of one batch k times larger (the original averages per micro-batch means instead).

    A batch whose loss or gradient is not finite changes nothing but the step counter: the parameters and
    optimizer state stay those of the last good step, and `metrics["nonfinite"]` is 1 (the loop decides
    whether to stop or skip it, `TrainConfig.skip_nonfinite`).
    """
    def step(state: TrainState, frozen: dict, micro_batches: dict):
        def micro(carry, xs):
            grads, total, count = carry
            i, batch = xs
            key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, state.step), i)
            (t, n), g = jax.value_and_grad(
                lambda p: batch_nll(module, merge_params(p, frozen), batch, length, key), has_aux=True)(state.params)
            return (jax.tree.map(jnp.add, grads, g), total + t, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        k = jax.tree.leaves(micro_batches)[0].shape[0]
        (grads, total, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.int32(0)),
                                                (jnp.arange(k), micro_batches))
        scale = 1.0 / jnp.maximum(count, 1)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        loss, grad_norm = total * scale, optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (optax.apply_updates(state.params, updates), opt_state),
                                         (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "nonfinite": (~finite).astype(jnp.int32)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step
