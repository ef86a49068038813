"""The jitted training step: a pure function of (state, batch)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from mgjax.model import MGM, splice_labels
from mgjax.train.loss import next_token_loss


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any


def loss_fn(module: MGM, params, batch: dict, length: int) -> jax.Array:
    """Mean next-token loss of a batch: input_ids, attention_mask, labels [B, T]; images, images_aux.
    `length` is the static merged sequence length."""
    logits, plan = module.apply({"params": params}, batch["input_ids"], batch["images"], batch["images_aux"],
                                batch["attention_mask"], length=length)
    return next_token_loss(logits, splice_labels(plan, batch["labels"]))


def make_train_step(module: MGM, tx: optax.GradientTransformation, length: int):
    """step(state, batch) -> (state, {"loss"}) for `jax.jit`."""
    def step(state: TrainState, batch: dict):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(module, p, batch, length))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), {"loss": loss}

    return step
