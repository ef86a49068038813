"""Sharded-vs-single-device checks, run in a subprocess with 8 fake CPU devices (tests/test_sharding.py).

Usage: python tests/sharded_worker.py OUT.json  (XLA_FLAGS must give 8 host devices)
Writes {check: value}; the pytest side asserts on it. Float32 throughout; errors are
max |sharded - single| / max |single|.
"""

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from mgjax.checkpoint import restore, save_streaming
from mgjax.config import CLIPConfig, ConvNextConfig, LMConfig, MeshConfig, MGMConfig
from mgjax.model import MGM, abstract_params, init_params
from mgjax.sharding import activate, batch_sharding, make_mesh, param_shardings, rules_for
from mgjax.train.step import loss_fn

# As small as the layouts allow (compiles of SPMD programs dominate the run time): 2x2 CLIP patches of
# 8x8 mined windows each, one decoder layer.
TOWERS = dict(vision=CLIPConfig(32, 64, 2, 4, 28, 14), vision_aux=ConvNextConfig((1, 1, 1, 1), (4, 8, 12, 16)),
              mm_hidden_size=32, mm_hidden_size_aux=40, image_size_aux=64)
LLAMA = LMConfig(vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128)
MIXTRAL = LMConfig(family="mixtral", vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=96, num_experts=4, num_experts_per_tok=2)
B, T = 8, 12


def batch(config: MGMConfig, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.lm.vocab_size, (B, T)).astype(np.int32)
    ids[:, 3] = -200
    mask = np.ones((B, T), np.int32)
    mask[1, -3:] = 0  # a right-padded row
    labels = np.where(rng.random((B, T)) < 0.7, ids, -100).astype(np.int32)
    labels[:, 3] = -100
    s, sa = config.image_size, config.image_size_aux
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "images": rng.standard_normal((B, s, s, 3)).astype(np.float32),
            "images_aux": rng.standard_normal((B, sa, sa, 3)).astype(np.float32)}


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


def forward(module, params, data, length):
    logits, _ = module.apply({"params": params}, data["input_ids"], data["images"], data["images_aux"],
                             data["attention_mask"], length=length)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(module, p, data, length))(params)
    return logits, loss, grads


def main(out_path):
    results = {"devices": jax.device_count()}
    length = T - 1 + 4
    for name, lm, meshes in (
            ("llama", LLAMA, {"8,1,1,1": MeshConfig(8, 1, 1, 1), "2,2,2,1": MeshConfig(2, 2, 2, 1),
                              "1,4,2,1": MeshConfig(1, 4, 2, 1)}),
            ("mixtral", MIXTRAL, {"2,1,1,4": MeshConfig(2, 1, 1, 4)})):
        config = MGMConfig(lm=lm, **TOWERS)
        module = MGM(config)
        params = init_params(module, jax.random.key(0))
        data = batch(config)
        ref_logits, ref_loss, ref_grads = jax.jit(lambda p, d: forward(module, p, d, length))(params, data)
        for mesh_name, mesh_cfg in meshes.items():
            mesh = make_mesh(mesh_cfg)
            rules = rules_for("fsdp_tp_ep")
            shardings = param_shardings(abstract_params(module, boxed=True), mesh, rules)
            sharded = jax.device_put(params, shardings)
            placed = {k: jax.device_put(v, batch_sharding(mesh, v.ndim, rules)) for k, v in data.items()}
            with activate(mesh, rules):
                logits, loss, grads = jax.jit(lambda p, d: forward(module, p, d, length))(sharded, placed)
            key = f"{name}/{mesh_name}"
            results[f"{key}/logits"] = rel(logits, ref_logits)
            results[f"{key}/loss"] = rel(loss, ref_loss)
            results[f"{key}/grads"] = tree_rel(grads, ref_grads)
            results[f"{key}/logits_batch_sharded"] = not logits.sharding.is_fully_replicated

    # Sharded init: created in place, never whole on one device.
    config = MGMConfig(lm=LLAMA, **TOWERS)
    module = MGM(config)
    mesh_a, mesh_b = make_mesh(MeshConfig(1, 4, 2, 1)), make_mesh(MeshConfig(2, 2, 1, 2))
    rules = rules_for("fsdp_tp_ep")
    params_a = init_params(module, jax.random.key(1), mesh_a, rules)
    kernel = params_a["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    results["init/up_proj_spec"] = str(kernel.sharding.spec)
    results["init/up_proj_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
    results["init/equals_unsharded"] = tree_rel(params_a, init_params(module, jax.random.key(1)))

    # Save from mesh A, restore onto mesh B.
    with tempfile.TemporaryDirectory() as tmp:
        save_streaming(Path(tmp) / "ckpt", [{"params": params_a}])
        shard_b = param_shardings(abstract_params(module, boxed=True), mesh_b, rules)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_params(module), shard_b)
        params_b = restore(Path(tmp) / "ckpt", {"params": abstract})["params"]
    results["restore/values"] = tree_rel(params_b, params_a)
    results["restore/on_mesh_b"] = all(p.sharding == s for p, s in zip(jax.tree.leaves(params_b),
                                                                       jax.tree.leaves(shard_b)))

    # A released checkpoint loaded straight onto a mesh, run through the public API.
    import mgjax
    from helpers import GOLDEN, nhwc

    ref = np.load(GOLDEN / "llama_vicuna" / "expected.npz")
    model = mgjax.load_pretrained(GOLDEN / "llama_vicuna" / "MGM-7B-tiny", mesh=make_mesh(MeshConfig(1, 4, 2, 1)))
    kernel = model.params["llm"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    results["load/gate_proj_spec"] = str(kernel.sharding.spec)
    results["load/logits"] = rel(model.logits(ref["input_ids"], nhwc(ref["images"]), nhwc(ref["images_aux"])),
                                 ref["logits"])
    # The training steps that tests/multihost_worker.py runs as two processes, as one process here.
    from multihost_worker import train_two_steps

    results.update({f"train/{k}": v for k, v in train_two_steps(0, 1).items()})
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
