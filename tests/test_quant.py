"""Weight-only quantisation (`mgjax.quant`, `load_pretrained(quantize=...)`, `--quantize`): the storage math,
the quantised parameter layout of every family, and quantised models against their float originals."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import mgjax
import tiny
from helpers import CASES, GOLDEN, golden_model, nhwc
from mgjax.errors import MGJaxError
from mgjax.lm.decoder import Decoder
from mgjax.model import MGM, abstract_params
from mgjax.quant import (dequantize, dequantize_params, int4_group, llm_bytes, matrix_layout, quantize,
                         quantize_params, quantized_shapes, weight_bytes)
from mgjax.sharding import DEFAULT_RULES, param_shardings

# (shape, start, n_in): a [in, out] kernel, o_proj's [heads, head_dim, out], experts' [E, in, out], a [V, D]
# embedding (a row per token), and odd sizes
MATRICES = [((64, 48), 0, 1), ((4, 16, 40), 0, 2), ((3, 24, 10), 1, 1), ((37, 32), 1, 1), ((6, 7), 0, 1)]


def _random(shape, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero output channel (an all-zero row for the embedding-like layouts)
    return w


@pytest.mark.parametrize("shape,start,n_in", MATRICES)
def test_int8_error_is_at_most_half_a_step(shape, start, n_in):
    w = _random(shape)
    q, scale = quantize(w, start, n_in, "int8")
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == quantized_shapes(shape, start, n_in, "int8")[1]
    back = np.asarray(dequantize(q, scale, start, shape[start:start + n_in], "int8", jnp.float32))
    step = np.expand_dims(np.asarray(scale), tuple(range(start, start + n_in)))
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-6))
    assert np.all(np.abs(np.asarray(q)) <= 127) and np.all(back[w == 0] == 0)


@pytest.mark.parametrize("shape,start,n_in", [m for m in MATRICES if m[0] != (6, 7)])
def test_int4_packing_is_exact_on_representable_values(shape, start, n_in):
    q_shape, scale_shape = quantized_shapes(shape, start, n_in, "int4")
    n = int(np.prod(shape[start:start + n_in]))
    g = int4_group(n)
    # values k * s with k in -7..7 and each group's largest |k| 7: scale s exactly, every value on the grid
    rng = np.random.default_rng(1)
    k = rng.integers(-7, 8, shape).astype(np.float32)
    grouped = k.reshape(*shape[:start], n // g, g, *shape[start + n_in:])
    grouped[(slice(None),) * (start + 1) + (0,)] = 7.0
    s = rng.uniform(0.5, 2.0, scale_shape).astype(np.float32)
    w = (grouped * np.expand_dims(s, start + 1)).reshape(shape)
    q, scale = quantize(w, start, n_in, "int4")
    assert q.dtype == jnp.uint8 and q.shape == q_shape and scale.shape == scale_shape
    np.testing.assert_allclose(np.asarray(scale), s, rtol=1e-6)
    back = dequantize(q, scale, start, shape[start:start + n_in], "int4", jnp.float32)
    np.testing.assert_allclose(np.asarray(back), w, rtol=1e-6, atol=1e-6)
    # a random matrix: within half a step of its group's scale
    w = _random(shape, seed=2)
    q, scale = quantize(w, start, n_in, "int4")
    back = np.asarray(dequantize(q, scale, start, shape[start:start + n_in], "int4", jnp.float32))
    step = np.repeat(np.asarray(scale), g, axis=start).reshape(*shape[:start], n, *shape[start + n_in:])
    assert np.all(np.abs(back - w).reshape(step.shape) <= step / 2 * (1 + 1e-6))


def test_int4_nibble_order_and_group_sizes():
    q, _ = quantize(np.array([[1.0], [-7.0], [7.0], [0.0]], np.float32), 0, 1, "int4")  # one group of 4
    assert q.shape == (1, 2, 1) and np.asarray(q)[0, :, 0].tolist() == [0x91, 0x07]  # row 0 low nibble, row 1 high
    assert (int4_group(4096), int4_group(11008), int4_group(64), int4_group(130)) == (128, 128, 64, 26)
    with pytest.raises(MGJaxError, match="does not split into groups"):
        int4_group(7)


def _decoder_params(config, rng=1):
    ids = jnp.zeros((2, 8), jnp.int32)
    return jax.eval_shape(lambda key: Decoder(config).init(key, ids, ids, ids > -1, method=Decoder.forward_ids),
                          jax.random.key(rng))["params"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("kind", list(tiny.LMS))
def test_quantised_layout_and_logical_axes(kind, mode):
    """The quantised module declares exactly what `quantize_params` makes of the float tree (shapes, dtypes),
    with logical axes the rule table knows; norms and Mixtral's router stay float."""
    config = tiny.lm(kind)
    boxed = {"llm": _decoder_params(dataclasses.replace(config, quant=mode))}
    declared = traverse_util.flatten_dict(nn.unbox(boxed))
    made = traverse_util.flatten_dict(jax.eval_shape(lambda p: quantize_params(p, mode),
                                                     {"llm": nn.unbox(_decoder_params(config))}))
    assert {p: (a.shape, a.dtype) for p, a in declared.items()} == {p: (a.shape, a.dtype) for p, a in made.items()}
    stored = jnp.dtype(jnp.int8 if mode == "int8" else jnp.uint8)
    quantised = [p for p in declared if declared[p].dtype == stored]
    assert ("llm", "embed_tokens", "embedding") in quantised
    assert all(p[-1] in ("kernel", "embedding", "w1", "w2", "w3") for p in quantised)
    assert not any("norm" in "/".join(p) or p[-2] == "gate" for p in quantised)
    rules = dict(DEFAULT_RULES)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(n is None or n in rules for n in leaf.names), path


FAMILIES = [*tiny.LMS, "mixtral_ragged"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_quantised_forward_tracks_float(kind):
    """Per family (Mixtral with both MoE impls; one layer): the quantised model equals the float model run on
    the dequantised weights, and stays close to the float original (top-1 over 2 x 32 random-id positions, the
    logits' max error relative to their largest)."""
    config = tiny.lm(kind.removesuffix("_ragged"), moe_impl="ragged" if kind.endswith("ragged") else "dense",
                     num_layers=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 32)), jnp.int32)
    positions, valid = jnp.broadcast_to(jnp.arange(32), ids.shape), jnp.ones(ids.shape, bool)
    shapes = _decoder_params(config)
    params = nn.unbox(jax.jit(Decoder(config).init, static_argnames="method")(
        jax.random.key(1), ids, positions, valid, method=Decoder.forward_ids)["params"])
    run = jax.jit(lambda p, mode: Decoder(dataclasses.replace(config, quant=mode)).apply(
        {"params": p}, ids, positions, valid, method=Decoder.forward_ids), static_argnums=1)
    ref = np.asarray(run(params, "none"))
    # Mixtral: the float router on slightly moved hidden states picks other experts for a few near-tied tokens
    moe = config.num_experts > 0
    for mode, agree, rel in (("int8", 0.9, 0.6 if moe else 0.05), ("int4", 0.3, 1.0)):
        q = quantize_params({"llm": params}, mode)
        out = np.asarray(run(q["llm"], mode))
        deq = dequantize_params(q, mode, {"llm": nn.unbox(shapes)})["llm"]
        np.testing.assert_allclose(out, np.asarray(run(deq, "none")), atol=1e-4 * np.abs(ref).max())
        assert (out.argmax(-1) == ref.argmax(-1)).mean() >= agree, mode
        assert np.abs(out - ref).max() <= rel * np.abs(ref).max(), mode


def test_released_presets_weight_ratios():
    """The issue's memory targets on a released LLM's shapes (abstract: nothing allocated): int8 0.5x and
    int4 0.28x of bfloat16."""
    from mgjax.presets import preset

    config = preset("MGM-7B")
    bf16 = llm_bytes(config, "none")
    assert 13e9 < bf16 < 14e9
    assert llm_bytes(config, "int8") / bf16 <= 0.51 and llm_bytes(config, "int4") / bf16 <= 0.28


PROMPTS = ("What is unusual about this image? Describe every detail you can see in it, one by one.",
           "Tell me a long story about a cat who lives on a boat and sails across the seas to find its home.",
           "List the colours of the rainbow in order and explain why the sky looks blue during the day.",
           "Write a short poem about the mountains in winter, the snow on the trees and the quiet valleys.")


@pytest.fixture(scope="module")
def int8_model():
    return mgjax.load_pretrained(GOLDEN / "llama_vicuna" / CASES["llama_vicuna"], quantize="int8")


def _prompt_logits(model):
    """Top-1 ids at every position of PROMPTS (one batch, right-padded, one compiled program)."""
    rows = [model.prompt_inputs(q, [])[0] for q in PROMPTS]
    width = max(len(r) for r in rows)
    ids = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
    mask = np.stack([np.arange(width) < len(r) for r in rows]).astype(np.int32)
    images, aux = model.zero_images(len(rows))
    top1 = np.asarray(model.logits(ids, images, aux, mask)).argmax(-1)
    return np.concatenate([top1[i, :len(r)] for i, r in enumerate(rows)])


def test_load_pretrained_int8_golden(int8_model, monkeypatch, capsys):
    """The golden Vicuna checkpoint loaded int8: config, weight bytes, top-1 agreement with the float model
    over >= 256 prompt positions, and the greedy answer to the case's image prompt equal to the original's
    first 8 tokens (int4's figures: bench/quant.py); then `mgjax generate --quantize int8` on the same model
    (one test: the programs compiled here serve it)."""
    float_model = golden_model("llama_vicuna")
    ref = _prompt_logits(float_model)
    assert len(ref) >= 256
    q = int8_model
    assert q.config.lm.quant == "int8" and q.module.config.lm.quant == "int8"
    assert q.params["llm"]["lm_head"]["kernel"].dtype == jnp.int8
    assert {a.dtype for a in jax.tree.leaves(q.params["vision_tower"])} == {jnp.dtype(jnp.float32)}
    # The tiny random fixture's logits are nearly flat (median top-1 margin 0.27 of a unit-std spread):
    # int8's 0.6% weight noise flips a few near-ties (bench/quant.py: 0.96); a trained model's far fewer.
    agreement = (_prompt_logits(q) == ref).mean()
    assert agreement >= 0.95, agreement
    # float32 scales on 64-wide rows: (1 + 4 / 64) / 4 of the float32 LLM
    assert weight_bytes(q.params) / weight_bytes(float_model.params) <= 0.27
    ref_case = np.load(GOLDEN / "llama_vicuna" / "expected.npz")
    out = q.generate(ref_case["input_ids"], nhwc(ref_case["images"]), nhwc(ref_case["images_aux"]), max_new_tokens=8)
    np.testing.assert_array_equal(out.token_ids[0], ref_case["generate_ids"][0, :8])
    _cli_generate_quantize(int8_model, monkeypatch, capsys)


def test_quantised_load_onto_a_mesh_and_from_an_mgjax_checkpoint(tmp_path):
    """With a mesh, every quantised leaf lands in its sharding; an mgjax checkpoint (convert) and a bfloat16
    load give the same quantised values / the load dtype's scales."""
    from mgjax.config import MeshConfig
    from mgjax.convert.mgjax_ckpt import convert
    from mgjax.model import abstract_params
    from mgjax.sharding import make_mesh

    path = GOLDEN / "llama_vicuna" / CASES["llama_vicuna"]
    mesh = make_mesh(MeshConfig.parse("fsdp=2,tensor=2"), jax.devices()[:4])
    model = mgjax.load_pretrained(path, quantize="int8", mesh=mesh)
    want = traverse_util.flatten_dict(param_shardings(abstract_params(model.module, boxed=True), mesh))
    for p, leaf in traverse_util.flatten_dict(model.params).items():
        assert leaf.sharding == want[p], p
    out = convert(path, tmp_path / "ckpt", dtype="float32", template="vicuna_v1")
    again = mgjax.load_pretrained(out, quantize="int8")
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bf16 = mgjax.load_pretrained(out, quantize="int4", dtype="bfloat16")
    flat = traverse_util.flatten_dict(bf16.params)
    assert {str(a.dtype) for a in flat.values()} == {"bfloat16", "uint8"}
    assert flat[("llm", "layers_0", "mlp", "up_proj", "kernel_scale")].dtype == jnp.bfloat16
    assert all(matrix_layout(p) is None or a.dtype == jnp.uint8 for p, a in flat.items())


def test_bad_quantize_value():
    with pytest.raises(MGJaxError, match="int8, int4"):
        mgjax.load_pretrained(GOLDEN / "llama_vicuna" / CASES["llama_vicuna"], quantize="int3")


def _cli_generate_quantize(int8_model, monkeypatch, capsys):
    """`mgjax generate --quantize int8` loads quantised and reports the LLM weight bytes on stderr."""
    from mgjax.cli import main

    seen = {}

    def load(path, **kwargs):
        seen.update(kwargs)
        return int8_model

    monkeypatch.setattr(mgjax, "load_pretrained", load)
    case = GOLDEN / "llama_vicuna"
    assert main(["generate", str(case / CASES["llama_vicuna"]), "--question", "What is unusual about this image?",
                 "--image", str(case / "input.jpg"), "--max-new-tokens", "8", "--quantize", "int8"]) == 0
    captured = capsys.readouterr()
    assert seen["quantize"] == "int8" and captured.out.strip()
    assert "LLM weights:" in captured.err and "as int8" in captured.err and "x of" in captured.err


def test_quantised_generation_compiles_for_a_tpu_slice():
    """`generate|eval --dry-run --topology SLICE --quantize int8`: the TPU compiler takes the int8 LLM (the
    dequantisation inside the programs); its weights per chip are about half the bfloat16 model's."""
    from mgjax.infer.aot import Workload, dry_run
    from mgjax.sharding import bytes_per_device, make_mesh, param_shardings
    from mgjax.config import MeshConfig
    from mgjax.topology import parse_slice

    config = mgjax.load_pretrained(GOLDEN / "llama_vicuna" / CASES["llama_vicuna"]).config
    int8 = dataclasses.replace(config, lm=dataclasses.replace(config.lm, quant="int8"))
    slice_ = parse_slice("v5e-4")
    r = dry_run(int8, slice_, Workload(4, 8, 16))
    assert r["fits"]
    mesh = make_mesh(MeshConfig.parse("fsdp=-1"), slice_.devices()[:slice_.chips_per_host])
    bf16 = MGM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    shardings = param_shardings(abstract_params(bf16, boxed=True), mesh)
    float_bytes = bytes_per_device(abstract_params(bf16), shardings)
    assert r["weights_bytes"] < 0.75 * float_bytes  # the towers (a third of this tiny model) stay bf16
