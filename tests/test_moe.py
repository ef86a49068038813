"""Mixtral's experts through `jax.lax.ragged_dot` (LMConfig.moe_impl="ragged"): outputs and gradients equal
the dense reference path, on one device and with the experts sharded over a mesh's expert axis; the
logits of a whole model against HF's MixtralForCausalLM are in tests/test_hf_parity.py (both paths).

Tolerance: relative error <= 1e-5 of the reference's largest value (float32; the ragged path adds a token's
k expert outputs in another order than the dense mixing einsum)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.config import LMConfig, MeshConfig
from mgjax.errors import MGJaxError
from mgjax.layers.mlp import MoE
from mgjax.sharding import activate, batch_sharding, make_mesh, param_shardings, rules_for


def _moe(impl):
    return MoE(num_experts=4, top_k=2, hidden=24, act="silu", impl=impl)


def _loss_and_grads(module, params, x, w):
    """A loss that weighs every output element differently, and its gradients wrt params and x."""
    def loss(p, x):
        return jnp.sum(module.apply({"params": p}, x) * w)

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def case():
    x = jax.random.normal(jax.random.key(1), (8, 6, 16))
    w = jax.random.normal(jax.random.key(2), (8, 6, 16))
    params = nn.meta.unbox(jax.jit(_moe("dense").init)(jax.random.key(0), x)["params"])
    return params, x, w


def test_ragged_equals_dense_outputs_and_gradients(case):
    params, x, w = case
    dense, ragged = _moe("dense"), _moe("ragged")
    y_dense = jax.jit(dense.apply)({"params": params}, x)
    y_ragged = jax.jit(ragged.apply)({"params": params}, x)
    assert _rel(y_ragged, y_dense) <= 1e-5
    (l_d, (g_d, gx_d)), (l_r, (g_r, gx_r)) = (jax.jit(_loss_and_grads, static_argnums=0)(m, params, x, w)
                                            for m in (dense, ragged))
    assert _rel(l_r, l_d) <= 1e-5 and _rel(gx_r, gx_d) <= 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_r), jax.tree.leaves(g_d)):
        assert _rel(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_ragged_handles_experts_without_tokens():
    """Route every token to experts 0 and 1 (a gate that ignores the input): experts 2 and 3 get empty
    groups, and the output still equals the dense path's."""
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    params = nn.meta.unbox(jax.jit(_moe("dense").init)(jax.random.key(0), x)["params"])
    params["gate"]["kernel"] = jnp.zeros_like(params["gate"]["kernel"])  # equal logits: top_k takes 0 and 1
    out = {impl: jax.jit(_moe(impl).apply)({"params": params}, x) for impl in ("dense", "ragged")}
    assert _rel(out["ragged"], out["dense"]) <= 1e-5


def _sharded_equals_one_device(case, shape):
    """The ragged block's loss and gradients on a (data, fsdp, tensor, expert) mesh of `shape` equal one
    device's; returns the sharded parameters and the compiled program's HLO text."""
    params, x, w = case
    module = _moe("ragged")
    ref = jax.jit(_loss_and_grads, static_argnums=0)(module, params, x, w)
    mesh, rules = make_mesh(MeshConfig(*shape)), rules_for("fsdp_tp_ep")
    boxed = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    sharded = jax.device_put(params, param_shardings(boxed, mesh, rules))
    xs, ws = (jax.device_put(a, batch_sharding(mesh, a.ndim, rules)) for a in (x, w))
    with activate(mesh, rules):
        step = jax.jit(_loss_and_grads, static_argnums=0)
        loss, (grads, gx) = step(module, sharded, xs, ws)
        text = step.lower(module, sharded, xs, ws).compile().as_text()
    assert _rel(loss, ref[0]) <= 1e-5 and _rel(gx, ref[1][1]) <= 1e-5
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[1][0])):
        assert _rel(a, b) <= 1e-5
    return sharded, text


def test_ragged_on_an_expert_sharded_mesh(case):
    """Experts split over expert=4 (the batch over data x expert): outputs and gradients equal one device's."""
    sharded, _ = _sharded_equals_one_device(case, (2, 1, 1, 4))
    assert not sharded["experts"]["w1"].sharding.is_fully_replicated


def test_ragged_splits_the_tokens_over_the_batch_axes(case):
    """data 2 x fsdp 2 x tensor 2: each device sorts and multiplies only its own rows' tokens (the MLP width over
    tensor, partial sums added), equal to one device's outputs and gradients. Left to the partitioner the sort
    gathered every token to every device (each did the whole batch's expert work)."""
    _, text = _sharded_equals_one_device(case, (2, 2, 2, 1))
    x = case[1]
    pairs = x.shape[0] * x.shape[1] * 2  # B*T*k
    sorted_rows = {int(n) for n in re.findall(r"\b(?:f32|bf16)\[(\d+),16\]", text)}
    assert pairs // 4 in sorted_rows and pairs not in sorted_rows  # 4 batch shards: a quarter of the pairs each


def test_unknown_moe_impl_is_a_clear_error():
    with pytest.raises(MGJaxError, match="moe_impl 'sparse' is not one of auto, dense, ragged"):
        LMConfig(family="mixtral", num_experts=4, num_experts_per_tok=2, moe_impl="sparse")
