"""Sharded execution. The numerical checks run once, in a subprocess with 8 fake CPU devices
(tests/sharded_worker.py); the layout checks run here on device-less (abstract) meshes of the
released full-size models.

Tolerance for sharded vs single-device logits, loss and gradients: relative error <= 1e-5 (float32;
the sharded programs sum in another order).
"""


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mgjax.config import MeshConfig
from mgjax.presets import preset
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params
from mgjax.sharding import abstract_mesh, param_shardings, rules_for

@pytest.mark.parametrize("case", ["llama/8,1,1,1", "llama/2,2,2,1", "llama/1,4,2,1", "mixtral/2,1,1,4"])
def test_sharded_equals_single_device(sharded, case):
    assert sharded["devices"] == 8
    for what in ("logits", "loss", "grads"):
        assert sharded[f"{case}/{what}"] <= 1e-5, (case, what, sharded[f"{case}/{what}"])
    assert sharded[f"{case}/logits_batch_sharded"]


def test_sharded_init_and_cross_mesh_restore(sharded):
    assert sharded["init/up_proj_spec"] == "P('fsdp', 'tensor')"
    assert sharded["init/up_proj_shard_shape"] == [16, 64]  # [64, 128] over fsdp=4, tensor=2
    assert sharded["init/equals_unsharded"] == 0.0
    assert sharded["restore/values"] == 0.0 and sharded["restore/on_mesh_b"]


def test_released_checkpoint_loaded_onto_a_mesh(sharded):
    """load_pretrained(..., mesh=) + Pretrained.logits on the golden case A (1e-5 x scale)."""
    assert sharded["load/gate_proj_spec"] == "P('fsdp', 'tensor')"
    assert sharded["load/logits"] <= 1e-5


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
    # MGM-2B is MQA: one kv head cannot be split over tensor=2
    with pytest.raises(MGJaxError, match=r"k_proj/kernel .*'kv_heads', size 1\) does not divide over mesh axes "
                                         r"\('tensor',\)"):
        _specs("MGM-2B", abstract_mesh(MeshConfig(1, 8, 2, 1), 16), "fsdp_tp")


def test_mesh_config():
    assert MeshConfig.parse("fsdp=-1,tensor=2").resolve(16) == (1, 8, 2, 1)
    assert MeshConfig.parse("data=2,expert=4").resolve(8) == (2, 1, 1, 4)
    with pytest.raises(MGJaxError, match="needs a multiple of 3 devices"):
        MeshConfig(tensor=3).resolve(8)
    with pytest.raises(MGJaxError, match="at most one -1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(MGJaxError, match="NAME=SIZE"):
        MeshConfig.parse("model=2")
