"""Sharded execution on 8 fake CPU devices (tests/conftest.py gives every test process 8), and layout
checks on device-less (abstract) meshes of the released full-size models.

Tolerance for sharded vs single-device logits, loss and gradients: relative error <= 1e-5 (float32;
the sharded programs sum in another order).
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import mgjax
from mgjax.checkpoint import restore, save_streaming
from mgjax.config import MeshConfig
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params, init_params
from mgjax.plan import job_for, plan
from mgjax.presets import preset
from mgjax.sharding import (abstract_mesh, activate, batch_sharding, bytes_per_device, make_mesh, mesh_rules,
                            param_shardings, rules_for)
from mgjax.train.step import loss_fn
import tiny
from helpers import GOLDEN, nhwc

LENGTH = 12 - 1 + 4  # tiny.batch's 12 ids with one image of 4 visual tokens (SMALL_TOWERS)


def _auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def tree_rel(a, b):
    """Worst per-leaf relative error. Leaves whose reference is below 1e-3 of the largest leaf (e.g. the
    gradient of a key bias, zero in exact arithmetic: softmax ignores a shift of all scores) are
    compared against that floor instead of their own rounding noise."""
    scale = max(float(np.abs(np.asarray(y)).max()) for y in jax.tree.leaves(b))
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max()) / max(float(np.abs(y).max()), 1e-3 * scale))
    return worst


def _forward(module, params, data):
    logits, _ = module.apply({"params": params}, data["input_ids"], data["images"], data["images_aux"],
                             data["attention_mask"], length=LENGTH)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(module, p, data, LENGTH))(params)
    return logits, loss, grads


@functools.cache
def _single_device(kind):
    """(module, params, batch, (logits, loss, grads)) of a one-layer tiny model of `kind`, unsharded."""
    config = tiny.mgm(kind, small=True, lm=tiny.lm(kind, num_layers=1))
    module = MGM(config)
    params = init_params(module, jax.random.key(0))
    data = tiny.batch(config)
    return module, params, data, jax.jit(functools.partial(_forward, module))(params, data)


MESHES = {  # (shape, axis names); a subset of the four axes is a valid mesh
    "2,2,2,1": ((2, 2, 2, 1), None), "1,4,2,1": ((1, 4, 2, 1), None), "2,1,1,4": ((2, 1, 1, 4), None),
    "1,2,4,1": ((1, 2, 4, 1), None), "data=2,fsdp=4": ((2, 4), ("data", "fsdp")), "fsdp=8": ((8,), ("fsdp",)),
}


def _mesh(name):
    shape, names = MESHES[name]
    return make_mesh(MeshConfig(*shape)) if names is None else _auto_mesh(shape, names)


@pytest.mark.parametrize("kind,mesh_name", [
    ("mixtral", "2,1,1,4"),
    ("gemma", "2,2,2,1"),  # data, fsdp and tensor at once; Gemma's single KV head replicated over tensor
    ("gemma", "1,2,4,1"),  # Gemma's single KV head, replicated over a tensor axis of 4
    ("llama_3", "data=2,fsdp=4"),  # a mesh with two of the four axes
])
def test_sharded_equals_single_device(kind, mesh_name, capfd):
    module, params, data, (ref_logits, ref_loss, ref_grads) = _single_device(kind)
    capfd.readouterr()
    mesh, rules = _mesh(mesh_name), rules_for("fsdp_tp_ep")
    sharded = jax.device_put(params, param_shardings(abstract_params(module, boxed=True), mesh, rules))
    placed = {k: jax.device_put(v, batch_sharding(mesh, v.ndim, rules)) for k, v in data.items()}
    with activate(mesh, rules):
        logits, loss, grads = jax.jit(functools.partial(_forward, module))(sharded, placed)
    assert rel(logits, ref_logits) <= 1e-5
    assert rel(loss, ref_loss) <= 1e-5
    assert tree_rel(grads, ref_grads) <= 1e-5
    assert not logits.sharding.is_fully_replicated  # the batch really was split
    # XLA's partitioner found a layout for every op (the token-embedding lookup once had none on 2,2,2,1)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_sharded_init_and_cross_mesh_restore(tmp_path):
    """Parameters created in their shards equal unsharded ones; saved from one mesh, restored onto another."""
    module = MGM(tiny.mgm("vicuna", small=True, lm=tiny.lm("vicuna", num_layers=1)))
    mesh_a, mesh_b = make_mesh(MeshConfig(1, 4, 2, 1)), make_mesh(MeshConfig(2, 2, 1, 2))
    rules = rules_for("fsdp_tp_ep")
    params_a = init_params(module, jax.random.key(1), mesh_a, rules)
    kernel = params_a["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (16, 64)  # [64, 128] over fsdp=4, tensor=2
    assert tree_rel(params_a, init_params(module, jax.random.key(1))) == 0.0
    save_streaming(tmp_path / "ckpt", [{"params": params_a}])
    shard_b = param_shardings(abstract_params(module, boxed=True), mesh_b, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_params(module), shard_b)
    params_b = restore(tmp_path / "ckpt", {"params": abstract})["params"]
    assert tree_rel(params_b, params_a) == 0.0
    assert all(p.sharding == s for p, s in zip(jax.tree.leaves(params_b), jax.tree.leaves(shard_b)))


@pytest.mark.parametrize("mesh_name", ["1,4,2,1", "data=2,fsdp=4", "fsdp=8"])
def test_released_checkpoint_loaded_onto_a_mesh(mesh_name):
    """load_pretrained(..., mesh=) + Pretrained.logits on the golden case A (1e-5 x scale), on a full
    mesh, on one with two of the four axes and on a 1-D FSDP mesh."""
    ref = np.load(GOLDEN / "llama_vicuna" / "expected.npz")
    model = mgjax.load_pretrained(GOLDEN / "llama_vicuna" / "MGM-7B-tiny", mesh=_mesh(mesh_name))
    kernel = model.params["llm"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert _same(kernel.sharding.spec, P("fsdp", "tensor") if mesh_name == "1,4,2,1" else P("fsdp"))
    assert rel(model.logits(ref["input_ids"], nhwc(ref["images"]), nhwc(ref["images_aux"])), ref["logits"]) <= 1e-5


def test_unknown_mesh_axis_is_a_clear_error():
    with pytest.raises(MGJaxError, match=r"mesh axis 'model' is not an mgjax axis; name mesh axes from data, fsdp, "
                                         r"tensor, expert"):
        mesh_rules(_auto_mesh((8,), ("model",)))


@pytest.mark.parametrize("name", ["MGM-2B", "MGM-7B", "MGM-13B", "MGM-8B", "MGM-8x7B", "MGM-34B-HD"])
def test_every_preset_shards_on_tensor_1_2_4_8(name):
    """Every released LLM (HD and stage-1 presets share them), including MGM-2B's single KV head,
    replicated when the tensor axis is wider (abstract meshes)."""
    module = MGM(preset(name))
    boxed = abstract_params(module, boxed=True)
    for tensor in (1, 2, 4, 8):
        shardings = param_shardings(boxed,
                                    abstract_mesh(MeshConfig(1, -1, tensor, 1), 64), rules_for("fsdp_tp"))
        k = shardings["llm"]["layers_0"]["self_attn"]["k_proj"]["kernel"].spec
        kv_split = module.config.lm.num_kv_heads % tensor == 0
        assert _same(k, P("fsdp", "tensor" if kv_split else None, None)), (name, tensor, k)


def test_planner_counts_replicated_kv_heads():
    """MGM-2B on fsdp=8 x tensor=2: the single-head k_proj is split by fsdp only, so each device holds
    an eighth of it (not a sixteenth), and the plan (which used to refuse this mesh) counts that."""
    c = preset("MGM-2B")
    mesh, rules = MeshConfig(1, 8, 2, 1), rules_for("fsdp_tp")
    shapes = abstract_params(MGM(c))
    shardings = param_shardings(abstract_params(MGM(c), boxed=True), abstract_mesh(mesh, 16), rules)
    k = ("llm", "layers_0", "self_attn", "k_proj", "kernel")
    leaf = functools.reduce(lambda t, p: t[p], k, shapes)
    assert bytes_per_device(leaf, functools.reduce(lambda t, p: t[p], k, shardings), 4) == 2048 * 256 * 4 // 8
    rows = plan(c, mesh, 16, job_for(c), rules).rows
    layers = sum(bytes_per_device(shapes["llm"][f"layers_{i}"], shardings["llm"][f"layers_{i}"], 4)
                 for i in range(c.lm.num_layers))
    assert rows["params (trainable)"] > layers


def _specs(name, mesh, rules):
    boxed = abstract_params(MGM(preset(name)), boxed=True)
    shardings = param_shardings(boxed, mesh, rules_for(rules))
    flat = jax.tree_util.tree_leaves_with_path(shardings)
    return {"/".join(k.key for k in path): s.spec for path, s in flat}, abstract_params(MGM(preset(name)))


GOLDEN_7B = {  # MGM-7B, fsdp_tp, mesh data=1 fsdp=64 tensor=2 (a v5p-128 slice)
    "llm/embed_tokens/embedding": P("tensor", "fsdp"),
    "llm/layers_0/self_attn/q_proj/kernel": P("fsdp", "tensor", None),
    "llm/layers_0/self_attn/k_proj/kernel": P("fsdp", "tensor", None),
    "llm/layers_0/self_attn/o_proj/kernel": P("tensor", None, "fsdp"),
    "llm/layers_0/mlp/gate_proj/kernel": P("fsdp", "tensor"),
    "llm/layers_0/mlp/down_proj/kernel": P("tensor", "fsdp"),
    "llm/layers_0/input_layernorm/scale": P("fsdp"),
    "llm/lm_head/kernel": P("fsdp", "tensor"),
    "vision_tower/embeddings/patch_embedding/kernel": P(None, None, None, "fsdp"),
    "vision_tower/encoder/layers_0/self_attn/q_proj/kernel": P("fsdp", "tensor", None),
    "vision_tower/encoder/layers_0/mlp/fc1/kernel": P("fsdp", "tensor"),
    "vision_tower_aux/vision_stages_2/blocks_0/mlp/fc1/kernel": P(None, "tensor"),
    "vision_tower_aux/vision_stages_2/blocks_0/conv_dw/kernel": P(),
    "vlm_uni_query_projector/1/kernel": P("fsdp", "tensor"),
    "vlm_uni_aux_projector/1/kernel": P(None, "fsdp"),
    "mm_projector/0/kernel": P("fsdp", "tensor"),
    "mm_projector/2/kernel": P("tensor", "fsdp"),
}


def _same(a, b):
    """PartitionSpecs equal up to trailing Nones."""
    strip = lambda s: tuple(s) + (None,) * (4 - len(s))  # noqa: E731
    return strip(a) == strip(b)


def test_partition_specs_golden_table():
    specs, _ = _specs("MGM-7B", abstract_mesh(MeshConfig(1, 64, 2, 1), 128), "fsdp_tp")
    for path, want in GOLDEN_7B.items():
        assert _same(specs[path], want), (path, specs[path], want)
    specs, _ = _specs("MGM-8x7B", abstract_mesh(MeshConfig(1, 16, 2, 4), 128), "fsdp_tp_ep")
    assert _same(specs["llm/layers_0/block_sparse_moe/experts/w1"], P("expert", "fsdp", "tensor"))
    assert _same(specs["llm/layers_0/block_sparse_moe/experts/w2"], P("expert", "tensor", "fsdp"))
    assert _same(specs["llm/layers_0/block_sparse_moe/gate/kernel"], P("fsdp", None))


@pytest.mark.parametrize("name", ["MGM-7B", "MGM-8x7B-HD", "MGM-34B-HD", "MGM-2B"])
def test_fsdp_leaves_no_large_parameter_replicated(name):
    """Under FSDP every parameter over 1 MiB is split, except the ConvNeXt tower's (replicated by
    design: 0.2B frozen parameters whose channel counts do not divide large FSDP axes)."""
    specs, shapes = _specs(name, abstract_mesh(MeshConfig(1, 16, 1, 1), 16), "fsdp")
    flat = {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(shapes)}
    big_replicated = [p for p, s in specs.items() if all(a is None for a in s)
                      and np.prod(flat[p].shape) * 4 > 2**20]
    assert big_replicated and all(p.startswith("vision_tower_aux/") for p in big_replicated), big_replicated


def test_indivisible_dimension_names_the_parameter():
    # MGM-13B has 40 heads: they cannot be split over tensor=16 (KV heads would be replicated instead)
    with pytest.raises(MGJaxError, match=r"_proj/kernel .*'heads', size 40\) does not divide over mesh axes "
                                         r"\('tensor',\)"):
        _specs("MGM-13B", abstract_mesh(MeshConfig(1, 4, 16, 1), 64), "fsdp_tp")


def test_mesh_config():
    assert MeshConfig.parse("fsdp=-1,tensor=2").resolve(16) == (1, 8, 2, 1)
    assert MeshConfig.parse("data=2,expert=4").resolve(8) == (2, 1, 1, 4)
    with pytest.raises(MGJaxError, match="needs a multiple of 3 devices"):
        MeshConfig(tensor=3).resolve(8)
    with pytest.raises(MGJaxError, match="at most one -1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(MGJaxError, match="NAME=SIZE"):
        MeshConfig.parse("model=2")
