"""Gated feed-forward blocks: SwiGLU / GeGLU MLP and the Mixtral mixture of experts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgjax.config import LoraConfig
from mgjax.layers.common import activation, dense
from mgjax.quant import matrix_param
from mgjax.sharding import constrain

Dtype = Any


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), no biases (Llama family and Gemma)."""

    hidden: int
    act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: str = "none"
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant, lora=self.lora)
        gate = dense(self.hidden, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(self.hidden, ("embed", "mlp"), name="up_proj", **kw)(x)
        return dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(activation(self.act)(gate) * up)


class Experts(nn.Module):
    """Stacked expert weights: w1 (gate) and w3 (up) [E, D, F], w2 (down) [E, F, D].

    `quant`: stored quantised (`mgjax.quant`). `lora`: when its targets name `{path}/w1` (w2, w3), that
    weight gets per-expert adapters `w1_lora_a` [E, D, r] and `w1_lora_b` [E, r, F], PEFT's adapters of
    each expert's Linear."""

    num_experts: int
    hidden: int
    act: str
    impl: str = "dense"  # MOE_IMPLS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: str = "none"
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, top_p: jax.Array, top_i: jax.Array) -> jax.Array:
        """x [B, T, D] through its top-k experts `top_i` [B, T, k], mixed by their weights `top_p` [B, T, k]."""
        e, d, f = self.num_experts, x.shape[-1], self.hidden
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        shapes = {"w1": ((d, f), ("embed", "mlp")), "w3": ((d, f), ("embed", "mlp")), "w2": ((f, d), ("mlp", "embed"))}
        w = {name: matrix_param(self, name, (e, *shape), ("expert", *axes), init, 1, 1, self.quant, self.param_dtype,
                                self.dtype) for name, (shape, axes) in shapes.items()}
        lora, scale = {}, None  # name -> (A [E, in, r], B [E, r, out]) in dtype
        if self.lora is not None:
            r, scale = self.lora.rank, jnp.asarray(self.lora.scale, self.dtype)
            a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                                      batch_axis=(0,))
            for name, ((n_in, n_out), (ax_in, ax_out)) in shapes.items():
                if self.lora.adapts("/".join((*self.path, name))):
                    a = self.param(f"{name}_lora_a", nn.with_logical_partitioning(a_init, ("expert", ax_in, None)),
                                   (e, n_in, r), self.param_dtype)
                    b = self.param(f"{name}_lora_b", nn.with_logical_partitioning(
                        nn.initializers.zeros_init(), ("expert", None, ax_out)), (e, r, n_out), self.param_dtype)
                    lora[name] = (a.astype(self.dtype), b.astype(self.dtype))
        training = bool(lora) and self.has_rng("dropout") and self.lora.dropout > 0
        x, top_p = x.astype(self.dtype), top_p.astype(self.dtype)
        # each adapter's input under its own dropout mask, as each PEFT Linear draws one
        xd = {n: nn.Dropout(self.lora.dropout)(x, deterministic=not training) for n in ("w1", "w3") if n in lora}
        act = activation(self.act)
        if self.impl == "dense":
            # The reference: every expert on every token, unselected ones weighted 0 (E / k times the FLOPs).
            combine = jnp.einsum("btk,btke->bte", top_p, jax.nn.one_hot(top_i, e, dtype=self.dtype))

            def up(name):  # [B, T, E, F]
                out = jnp.einsum("btd,edf->btef", x, w[name])
                if name in lora:
                    a, b = lora[name]
                    out = out + jnp.einsum("bter,erf->btef", jnp.einsum("btd,edr->bter", xd[name], a), b) * scale
                return out

            # The [B, T, E, .] intermediates split by rows like every activation: left to XLA, their
            # gradients took the experts' split and were fully rematerialised on a data x expert mesh.
            h = constrain(act(up("w1")) * up("w3"), ("act_batch", "act_len", "act_expert", "act_mlp"))
            y = jnp.einsum("btef,efd->bted", h, w["w2"])
            if "w2" in lora:
                a, b = lora["w2"]
                hd = nn.Dropout(self.lora.dropout)(h, deterministic=not training)
                y = y + jnp.einsum("bter,erd->bted", jnp.einsum("btef,efr->bter", hd, a), b) * scale
            y = constrain(y, ("act_batch", "act_len", "act_expert", "act_embed"))
            return jnp.einsum("bted,bte->btd", y, combine)
        # Dropless dispatch: the B*T*k (token, expert) pairs sorted by expert, each expert's rows one group of
        # a ragged matmul, the outputs weighted and added back to their tokens (as HF's index_add does).
        # Under a mesh each shard of rows sorts and multiplies its own tokens (`jax.shard_map`; the MLP width
        # split over tensor, the down projection's partial sums added over it): left to the SPMD partitioner,
        # the sort over the flattened batch gathered every row to every device, and each device did the whole
        # batch's expert work (MGM-8x7B-HD stage 2 on v5p-64: 32x the FLOPs, seen by the TPU compiler).
        mesh = jax.sharding.get_abstract_mesh()
        rows_axes, mlp_axes = (None, None) if mesh.empty else nn.logical_to_mesh_axes(("act_batch", "act_mlp"))
        key = self.make_rng("dropout") if training and "w2" in lora else None
        rate = self.lora.dropout if lora else 0.0

        def dispatch(x, xd, top_p, top_i, w, lora, key):
            b, t, k = top_i.shape
            flat_e = top_i.reshape(-1)
            order = jnp.argsort(flat_e, stable=True)
            token = order // k  # [B*T*k] the token of each sorted pair
            sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)

            def matmul(rows, name, lora_rows):
                out = jax.lax.ragged_dot(rows, w[name], sizes)
                if name in lora:
                    a, b_ = lora[name]
                    out = out + jax.lax.ragged_dot(jax.lax.ragged_dot(lora_rows, a, sizes), b_, sizes) * scale
                return out

            rows = x.reshape(b * t, d)[token]
            gathered = {n: v.reshape(b * t, d)[token] for n, v in xd.items()}
            h = act(matmul(rows, "w1", gathered.get("w1"))) * matmul(rows, "w3", gathered.get("w3"))
            hd = h
            if key is not None:  # each shard its own mask
                for axes in (rows_axes, mlp_axes):
                    if axes is not None:
                        key = jax.random.fold_in(key, jax.lax.axis_index(axes))
                keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
                hd = jnp.where(keep, h / (1.0 - rate), 0).astype(h.dtype)
            y = matmul(h, "w2", hd) * top_p.reshape(-1)[order][:, None]
            out = jnp.zeros((b * t, d), y.dtype).at[token].add(y).reshape(b, t, d)
            return out if mlp_axes is None else jax.lax.psum(out, mlp_axes)

        if mesh.empty:
            return dispatch(x, xd, top_p, top_i, w, lora, key)
        tokens = jax.P(rows_axes, None, None)
        w_in, w_out = jax.P(None, None, mlp_axes), jax.P(None, mlp_axes, None)
        w_specs = {"w1": w_in, "w3": w_in, "w2": w_out}
        # adapters: A of w1 / w3 and B of w2 whole on every shard, the other factor split like its weight
        lora_specs = {n: (jax.P(), w_in) if n != "w2" else (w_out, jax.P()) for n in lora}
        return jax.shard_map(dispatch, mesh=mesh,
                             in_specs=(tokens, {n: tokens for n in xd}, tokens, tokens, w_specs, lora_specs,
                                       None if key is None else jax.P()),
                             out_specs=tokens, check_vma=False)(x, xd, top_p, top_i, w, lora, key)


class MoE(nn.Module):
    """Mixtral sparse MoE block, routed exactly as HF: softmax over all experts in float32,
    top-k, renormalised over the chosen k, weights cast to the compute dtype."""

    num_experts: int
    top_k: int
    hidden: int
    act: str
    impl: str = "dense"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: str = "none"  # the experts' storage; the router stays float (routing is what quantisation would flip)
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        logits = dense(self.num_experts, ("embed", None), use_bias=False, name="gate", lora=self.lora, **kw)(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top_p, top_i = jax.lax.top_k(probs, self.top_k)
        top_p = top_p / top_p.sum(-1, keepdims=True)
        return Experts(self.num_experts, self.hidden, self.act, self.impl, quant=self.quant, lora=self.lora,
                       name="experts", **kw)(x, top_p, top_i)
