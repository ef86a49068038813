"""Fast paths that are config switches, each equal to the plain path it replaces (the Mixtral ragged
experts are in tests/test_moe.py):

- `LMConfig.loss_chunk`: the LM head + cross-entropy over chunks of positions under `jax.checkpoint`;
  loss and every parameter's gradient equal the one-head loss, for an LLM built like each released family
  (the head is the tied embedding for Gemma), and on packed rows with a chunk that does not divide L - 1.
- `LMConfig.attention_impl`: "causal" (query blocks over the keys they see; also a prompt pass into a
  cache), "cudnn" (`jax.nn.dot_product_attention`, XLA's on this CPU) and "splash" (the Pallas TPU kernel,
  interpreted on this CPU; per shard under a mesh) against "xla", for every family, with padding and
  packed rows (logits at the valid positions, gradients).
- `ConvNextConfig.depthwise_impl`: "grouped" (XLA's grouped convolution) against "shifted".

Tolerance: float32; relative error <= 1e-5 of the reference's largest value (the chunks sum the positions
in another order).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from mgjax.config import MeshConfig
from mgjax.layers import attention
from mgjax.lm.decoder import Decoder, init_cache
from mgjax.model import MGM, init_params
from mgjax.sharding import DEFAULT_RULES, activate, make_mesh
from mgjax.train.loss import chunked_next_token_nll, next_token_nll
from mgjax.train.step import batch_nll, merge_params, split_params
from mgjax.vision.convnext import ConvNextTrunk, DepthwiseConv

FAMILIES = tuple(tiny.LMS)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _assert_trees_close(a, b, tol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert _rel(x, y) <= tol, jax.tree_util.keystr(path)


def test_chunked_loss_equals_one_head_on_packed_rows():
    """Segments, ignored labels and a chunk (5) that does not divide L - 1 (15); a linear head."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 40)), jnp.float32)
    labels = jnp.asarray(np.where(rng.random((3, 16)) < 0.7, rng.integers(0, 40, (3, 16)), -100), jnp.int32)
    segments = jnp.asarray(np.sort(rng.integers(0, 3, (3, 16)), axis=1), jnp.int32)

    def plain(h, w):
        return next_token_nll(h @ w, labels, segments)[0]

    def chunked(h, w):
        return chunked_next_token_nll(lambda x: x @ w, h, labels, segments, 5)[0]

    (l_p, g_p), (l_c, g_c) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, w) for f in (plain, chunked))
    assert _rel(l_c, l_p) <= 1e-5
    _assert_trees_close(g_c, g_p)
    assert chunked_next_token_nll(lambda x: x @ w, hidden, labels, segments, 5)[1] == \
        next_token_nll(hidden @ w, labels, segments)[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_chunk_equals_one_head(family):
    """An LLM built like each released family: the chunked loss of its hidden states (chunk 5 of 15
    targets) and its gradients equal `next_token_nll` of its logits."""
    config = tiny.lm(family)
    decoder = Decoder(config)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 16)), jnp.int32)
    labels = jnp.where(jnp.asarray(rng.random((2, 16)) < 0.7), ids, -100)
    positions, valid = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.ones((2, 16), bool)
    params = jax.jit(decoder.init, static_argnames="method")(
        jax.random.key(0), ids, positions, valid, method=Decoder.forward_ids)["params"]

    def plain(p):
        return next_token_nll(decoder.apply({"params": p}, ids, positions, valid, method=Decoder.forward_ids),
                              labels)[0]

    def chunked(p):
        hidden = decoder.apply({"params": p}, ids, positions, valid,
                               method=lambda m, *a: m(m.embed(a[0]), *a[1:], hidden_only=True))
        return chunked_next_token_nll(lambda h: decoder.apply({"params": p}, h, method=Decoder.head),
                                      hidden, labels, None, 5)[0]

    (l_p, g_p), (l_c, g_c) = (jax.jit(jax.value_and_grad(f))(params) for f in (plain, chunked))
    assert _rel(l_c, l_p) <= 1e-5
    _assert_trees_close(g_c, g_p)


def test_train_loss_with_loss_chunk():
    """The training loss (`batch_nll`, images spliced in) and the gradients of the LLM and projector with
    loss_chunk 7 (merged length 27: 4 chunks, the last one short) equal loss_chunk 0."""
    config = tiny.mgm("vicuna", small=True)
    module = MGM(config)
    chunked = MGM(dataclasses.replace(config, lm=dataclasses.replace(config.lm, loss_chunk=7)))
    trainable, frozen = split_params(init_params(module, jax.random.key(0)), ["llm", "mm_projector"])
    data = tiny.batch(config, rows=2)
    length = 12 - 1 + config.tokens_per_image

    def run(m):
        loss = jax.value_and_grad(lambda p: batch_nll(m, merge_params(p, frozen), data, length), has_aux=True)
        return jax.jit(loss)(trainable)

    (total, count), grads = run(module)
    (total_c, count_c), grads_c = run(chunked)
    assert int(count_c) == int(count) > 0
    assert _rel(total_c, total) <= 1e-5
    _assert_trees_close(grads_c, grads)


def _decoder_inputs(config, rows=2, length=20, seed=2):
    """Ids, positions, valid (row 1 right-padded by 6) and packed segments (row 0: two samples)."""
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (rows, length)), jnp.int32)
    valid = jnp.asarray(np.arange(length)[None] < np.array([length, length - 6])[:, None])
    segments = np.where(np.asarray(valid), 1, 0)
    segments[0, 9:] = 2
    positions = np.where(segments == 2, np.arange(length) - 9, np.arange(length))
    return ids, jnp.asarray(positions, jnp.int32), valid, jnp.asarray(segments, jnp.int32)


def _packed_forward(decoder, ids, positions, valid, segments):
    return decoder(decoder.embed(ids), positions, valid, segments)


def _attention_case(family):
    config = tiny.lm(family)
    ids, positions, valid, segments = _decoder_inputs(config)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((*ids.shape, config.vocab_size)), jnp.float32)

    def loss(p, impl):
        decoder = Decoder(dataclasses.replace(config, attention_impl=impl))
        logits = decoder.apply({"params": p}, ids, positions, valid, segments, method=_packed_forward)
        return jnp.sum(jnp.where(valid[..., None], logits * weights, 0.0)), logits

    params = jax.jit(Decoder(config).init, static_argnames="method")(
        jax.random.key(0), ids, positions, valid, method=Decoder.forward_ids)["params"]
    return params, valid, jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)


@pytest.mark.parametrize("impl", ["causal", "cudnn", "splash"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_impl_equals_xla(family, impl, monkeypatch):
    """Logits at the valid positions (a right-padded row, a packed row of two samples) and the gradients
    of a loss over them equal the "xla" reference, for an LLM built like each released family ("causal"
    in query blocks of 4, so that the rows span several)."""
    monkeypatch.setattr(attention, "_QUERY_BLOCK", 4)
    params, valid, run = _attention_case(family)
    (l_x, logits_x), g_x = run(params, "xla")
    (l_i, logits_i), g_i = run(params, impl)
    keep = np.asarray(valid)
    assert _rel(np.asarray(logits_i)[keep], np.asarray(logits_x)[keep]) <= 1e-5
    assert _rel(l_i, l_x) <= 1e-5
    _assert_trees_close(g_i, g_x)


@pytest.mark.parametrize("family,shape", [("gemma", (2, 1, 4, 1)), ("llama_3", (1, 2, 4, 1))])
def test_splash_attention_under_a_mesh(family, shape):
    """Under a mesh the splash kernel runs per shard (`jax.shard_map`: rows over data/fsdp, heads over
    tensor; Gemma's single KV head repeated to the query heads first): the same logits and gradients as
    the unsharded "xla" reference."""
    params, valid, run = _attention_case(family)
    (l_x, logits_x), g_x = run(params, "xla")
    mesh = make_mesh(MeshConfig(*shape))
    with activate(mesh, DEFAULT_RULES):
        (l_s, logits_s), g_s = run(params, "splash")
    keep = np.asarray(valid)
    assert _rel(np.asarray(logits_s)[keep], np.asarray(logits_x)[keep]) <= 1e-5
    assert _rel(l_s, l_x) <= 1e-5
    _assert_trees_close(g_s, g_x)


def test_grouped_depthwise_convolution_equals_shifted():
    """XLA's grouped depthwise convolution: output and gradients (input, kernel, bias) equal the shifted-products
    reference; the trunk built with depthwise_impl "grouped" gives the same four stage maps."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 12, 12, 8)), jnp.float32)
    params = jax.jit(DepthwiseConv(8).init)(jax.random.key(0), x)["params"]

    def loss(p, x, impl):
        return jnp.sum(jnp.sin(DepthwiseConv(8, impl=impl).apply({"params": p}, x)))

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (l_s, g_s), (l_g, g_g) = run(params, x, "shifted"), run(params, x, "grouped")
    assert _rel(l_g, l_s) <= 1e-5
    _assert_trees_close(g_g, g_s)

    config = tiny.CONVNEXT
    pixels = jnp.asarray(rng.standard_normal((1, 64, 64, 3)), jnp.float32)
    trunk_params = jax.jit(ConvNextTrunk(config).init)(jax.random.key(0), pixels)["params"]
    stages = {impl: jax.jit(ConvNextTrunk(dataclasses.replace(config, depthwise_impl=impl)).apply)(
        {"params": trunk_params}, pixels) for impl in ("shifted", "grouped")}
    for a, b in zip(stages["grouped"], stages["shifted"], strict=True):
        assert _rel(a, b) <= 1e-5


def _cached_run(config, steps=2):
    """Logits of a prompt pass into a KV cache (rows left-padded by 0 and 3 slots) and `steps` greedy
    decode steps: [B, T, V] and `steps` x [B, 1, V]. T = 11, S = 13 slots: not a multiple of the block."""
    rng = np.random.default_rng(5)
    b, t = 2, 11
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    prompt_valid = jnp.asarray(np.arange(t)[None] >= np.array([0, 3])[:, None])
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    valid = jnp.concatenate([prompt_valid, jnp.ones((b, steps), bool)], axis=1)
    decoder = Decoder(config)
    params = jax.jit(decoder.init, static_argnames="method")(
        jax.random.key(0), ids, positions, prompt_valid, method=Decoder.forward_ids)["params"]

    def step(decoder, ids, positions, cache, index):
        return decoder(decoder.embed(ids), positions, valid, cache=cache, index=index)

    @jax.jit
    def run(params):
        logits, cache = decoder.apply({"params": params}, ids, positions, init_cache(config, b, t + steps, jnp.float32),
                                      0, method=step)
        out, pos = [logits], positions[:, -1]
        for i in range(steps):
            pos = pos + 1
            token = jnp.argmax(out[-1][:, -1], axis=-1)
            logits, cache = decoder.apply({"params": params}, token[:, None], pos[:, None], cache, t + i, method=step)
            out.append(logits)
        return out

    return run(params), prompt_valid


@pytest.mark.parametrize("family,scan", [(f, False) for f in FAMILIES] + [("vicuna", True)])
def test_blocked_cache_attention_equals_every_slot(family, scan, monkeypatch):
    """`cache_block` 4 (13 slots: the last block overlaps the one before it; the rows' padding differs) gives
    the logits of attending over every slot, for the prompt pass and two decode steps, for every family;
    so does "causal" attention (query blocks of 4), which runs the prompt pass over the prompt's own keys."""
    monkeypatch.setattr(attention, "_QUERY_BLOCK", 4)
    config = tiny.lm(family, scan_layers=scan, attention_impl="xla")
    ref, prompt_valid = _cached_run(config)
    keep = np.asarray(prompt_valid)
    for impl in ("xla", "causal"):
        got, _ = _cached_run(dataclasses.replace(config, cache_block=4, attention_impl=impl))
        assert _rel(np.asarray(got[0])[keep], np.asarray(ref[0])[keep]) <= 1e-5
        for a, b in zip(got[1:], ref[1:], strict=True):
            assert _rel(a, b) <= 1e-5
