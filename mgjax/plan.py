"""Memory planner: per-device bytes of a training job on a mesh, without allocating anything.

Parameters, gradients and optimizer state come exactly from `eval_shape` and the sharding rule
table. Activations are an estimate from the shapes (see `activation_bytes`): the saved layer
inputs (or more, by remat policy) plus the largest transient working set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mgjax.config import MeshConfig, MGMConfig
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params
from mgjax.sharding import BATCH_AXES, Rules, abstract_mesh, batch_shards, bytes_per_device, param_shardings
from mgjax.topology import CHIPS as TPU_CHIPS

GiB = 1024**3
# Accelerator memory per chip (HBM), GiB: the TPUs' from mgjax.topology (the docs' figures; a --topology compile
# reads the compiler's own), the GPUs' from the vendors.
CHIPS = {**{k: c.hbm_bytes / GiB for k, c in TPU_CHIPS.items()},
         "a100-40g": 40, "a100-80g": 80, "h100": 80, "h200": 141}
# Dense bf16 peak per chip, TFLOP/s (vendor figures), for the MFU that `mgjax train` logs.
PEAK_TFLOPS = {**{k: c.peak_flops / 1e12 for k, c in TPU_CHIPS.items()},
               "a100-40g": 312, "a100-80g": 312, "h100": 989, "h200": 989}
# jax `device_kind` substrings -> chip, most specific first.
_DEVICE_KINDS = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"),
                 ("v5", "v5p"), ("v4", "v4"), ("a100", "a100-80g"), ("h100", "h100"), ("h200", "h200"))


def model_flops(config: MGMConfig, rows: int, length: int, images: int) -> float:
    """Model FLOPs of one training step (what MFU counts: no recomputation, no padding discount): the LLM's
    6 N_active per token plus attention's 12 L H hd T (PaLM, appendix B) over `rows` x `length` tokens, N_active
    its matmul weights a token passes (the LM head, the routed k of E experts; not the embedding lookup), and the
    frozen CLIP tower's forward (the layers MGM uses), 2 N per patch, over every view of `images` images. The
    ConvNeXt tower and the mining projections (under 1% of a released step) are left out."""
    lm, v = config.lm, config.vision
    attention = lm.hidden_size * lm.head_dim * (2 * lm.num_heads + 2 * lm.num_kv_heads)
    mlp = 3 * lm.hidden_size * lm.intermediate_size
    if lm.num_experts:
        mlp = mlp * lm.num_experts_per_tok + lm.hidden_size * lm.num_experts
    n_active = lm.num_layers * (attention + mlp) + lm.hidden_size * lm.vocab_size
    tokens = rows * length
    llm = 6 * n_active * tokens + 12 * lm.num_layers * lm.num_heads * lm.head_dim * length * tokens
    patches = (v.image_size // v.patch_size) ** 2 + 1
    clip = 2 * config.clip_layers_used * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) * patches
    return llm + clip * images * config.num_views


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this `jax.Device.device_kind`; None when unknown (CPU)."""
    kind = device_kind.lower()
    chip = next((c for k, c in _DEVICE_KINDS if k in kind), None)
    return None if chip is None else PEAK_TFLOPS[chip] * 1e12


# What trains in each stage of the recipe (docs/mgm_spec.md section 9); the towers are frozen in both.
TRAINABLE = {1: ("mm_projector", "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector"),
             2: ("llm", "mm_projector", "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")}
REMAT = ("full", "dots", "none")


@dataclass(frozen=True)
class Job:
    """What the planner needs to know about a training job."""

    global_batch: int = 128
    seq_len: int = 2048  # merged length (text + visual tokens), i.e. tokenizer_model_max_length
    grad_accum: int = 1
    stage: int = 2
    remat: str = "full"
    param_bytes: int = 4  # float32 master weights of trainable parameters
    frozen_bytes: int = 2  # frozen towers kept in bfloat16
    compute_bytes: int = 2  # bfloat16 activations


@dataclass
class Plan:
    rows: dict[str, float]  # bytes per device
    total: float
    chip_bytes: float | None
    micro_batch: int

    @property
    def fits(self) -> bool | None:
        return None if self.chip_bytes is None else self.total <= self.chip_bytes


def activation_bytes(config: MGMConfig, job: Job, b: int, tp: int) -> dict[str, float]:
    """Estimated activation bytes per device for a micro-batch of `b` samples per device.

    LLM, per layer: remat "full" keeps the layer input [b, L, D]; "dots" also the matmul outputs
    (q, k, v, attention output, gate, up, down); "none" everything including the attention
    probabilities. The transient peak is one layer's recomputation (scores and probabilities in
    float32 [b, H/tp, L, L], the MLP's [b, L, F/tp] tensors) plus the float32 logits and their
    gradient [b, L, V/tp]. Vision (frozen, forward only): the largest transient per image is
    ConvNeXt's concatenated map [S/4, S/4, 2880] and its first stage's 4C MLP.
    """
    lm, s = config.lm, job.compute_bytes
    # mgjax's MoE runs its dense reference path: every expert on every token
    L, D, F = job.seq_len, lm.hidden_size, lm.intermediate_size * max(1, lm.num_experts)
    H, KV, hd = lm.num_heads, lm.num_kv_heads, lm.head_dim
    qkv_o = b * L * (2 * H + 2 * KV) * hd / tp
    mlp = 3 * b * L * F / tp
    scores = b * H / tp * L * L
    per_layer = {"full": b * L * D * s,
                 "dots": b * L * D * s + (qkv_o + mlp) * s,
                 "none": b * L * D * s * 4 + (qkv_o + mlp) * s * 2 + scores * (4 + s)}[job.remat]
    saved = per_layer * lm.num_layers
    transient = scores * 8 + mlp * s * 2 + 2 * b * L * lm.vocab_size / tp * 4
    side = job.compute_bytes * (config.image_size_aux // 4) ** 2
    vision = b * side * (config.mm_hidden_size_aux + 4 * config.vision_aux.dims[0]) * 2
    return {"activations (saved)": saved, "activations (peak transient)": transient, "vision (transient)": vision}


def plan(config: MGMConfig, mesh: MeshConfig, num_devices: int, job: Job, rules: Rules,
         chip: str | None = None) -> Plan:
    if job.remat not in REMAT:
        raise MGJaxError(f"remat {job.remat!r} is not one of {REMAT}")
    if job.stage not in TRAINABLE:
        raise MGJaxError(f"stage {job.stage} is not 1 or 2")
    amesh = abstract_mesh(mesh, num_devices)
    module = MGM(config)
    boxed = abstract_params(module, boxed=True)
    shapes = abstract_params(module)
    shardings = param_shardings(boxed, amesh, rules)

    def per_device(top_keys, itemsize, negate=False):
        return sum(bytes_per_device(shapes[k], shardings[k], itemsize) for k in shapes if (k in top_keys) != negate)

    trainable = TRAINABLE[job.stage]
    n_batch = batch_shards(amesh)
    if job.global_batch % (n_batch * job.grad_accum):
        raise MGJaxError(f"global batch {job.global_batch} does not split into {job.grad_accum} accumulation steps "
                         f"over {n_batch} batch shards (mesh axes {', '.join(BATCH_AXES)})")
    b = job.global_batch // n_batch // job.grad_accum
    rows = {
        "params (trainable)": per_device(trainable, job.param_bytes),
        "params (frozen)": per_device(trainable, job.frozen_bytes, negate=True),
        "gradients": per_device(trainable, 4),
        "optimizer (AdamW m, v)": per_device(trainable, 8),
    }
    if job.grad_accum > 1:
        rows["gradient accumulator"] = per_device(trainable, 4)
    rows.update(activation_bytes(config, job, b, amesh.shape["tensor"]))
    total = sum(rows.values())
    chip_bytes = None
    if chip is not None:
        if chip not in CHIPS:
            raise MGJaxError(f"unknown chip {chip!r}; known: {', '.join(CHIPS)}")
        chip_bytes = CHIPS[chip] * GiB
    return Plan(rows, total, chip_bytes, b)


def format_plan(name: str, p: Plan, mesh_shape: tuple, job: Job, chip: str | None) -> str:
    lines = [f"{name}: stage {job.stage}, global batch {job.global_batch} (micro-batch {p.micro_batch} per device, "
             f"{job.grad_accum} accumulation steps), length {job.seq_len}, remat {job.remat}",
             f"mesh data={mesh_shape[0]} fsdp={mesh_shape[1]} tensor={mesh_shape[2]} expert={mesh_shape[3]} "
             f"({int(np.prod(mesh_shape))} devices)", "", f"{'per device':<32}{'GiB':>10}"]
    lines += [f"{k:<32}{v / GiB:>10.2f}" for k, v in p.rows.items()]
    lines.append(f"{'total':<32}{p.total / GiB:>10.2f}")
    if chip is not None:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"{chip} HBM {p.chip_bytes / GiB:.0f} GiB: {verdict} ({p.total / p.chip_bytes:.0%} used)")
    return "\n".join(lines)


def job_for(config: MGMConfig, **overrides) -> Job:
    """The released recipe's job for this model (docs/mgm_spec.md section 9), with overrides."""
    stage = overrides.get("stage", 2)
    defaults = dict(global_batch=256 if stage == 1 else 128, seq_len=config.max_length)
    return dataclasses.replace(Job(**defaults), **overrides)

