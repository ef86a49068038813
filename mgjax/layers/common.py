"""Dense layers, norms and activations with logical axis names on every parameter."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgjax.config import LoraConfig
from mgjax.quant import matrix_param
from mgjax.sharding import target_platform

Dtype = Any


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting the last `in_axes` dims of x; kernel [*in, *features].

    The kernel is created in its final shape with logical `axes` (in dims, then out dims): the
    transpose of torch's Linear [out, in], reshaped. (flax's DenseGeneral creates multi-axis kernels
    flat and reshapes them, which breaks logical constraints under a mesh.)

    `quant` int8 / int4: the kernel is stored quantised (`mgjax.quant`). `lora`: when its targets name this
    module's path, LoRA adapters lora_a [*in, r] and lora_b [r, *features] add (alpha / r) x' A B, x' = x
    under dropout while a "dropout" rng is given (training), as PEFT's `lora.Linear` does.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool
    in_axes: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: str = "none"
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = self.in_axes, len(self.features)
        init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        in_shape = x.shape[-n_in:]
        kernel = matrix_param(self, "kernel", (*in_shape, *self.features), self.axes, init, 0, n_in, self.quant,
                              self.param_dtype, self.dtype)
        lead = x.shape[:x.ndim - n_in]
        if target_platform() == "cpu":
            # one row axis: XLA:CPU's kernel gradient contracting [B, T] as two axes ran 30% slower (SwiGLU
            # forward + backward at 2 x 768 x 640 -> 1728: 208 vs 160 ms, as PyTorch's 162 ms)
            x = x.reshape(-1, *in_shape)
        x = x.astype(self.dtype)
        y = _contract(x, kernel, n_in)
        if self.lora is not None and self.lora.adapts("/".join(self.path)):
            r = self.lora.rank
            # PEFT's kaiming_uniform(a=sqrt(5)) of lora_A: U(+-1 / sqrt(fan_in))
            a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)),
                                                      out_axis=n_in)
            a = self.param("lora_a", nn.with_logical_partitioning(a_init, (*self.axes[:n_in], None)),
                           (*in_shape, r), self.param_dtype)
            b_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, *self.axes[n_in:]))
            b = self.param("lora_b", b_init, (r, *self.features), self.param_dtype)
            xd = nn.Dropout(self.lora.dropout)(x, deterministic=not self.has_rng("dropout"))
            down = _contract(xd, a.astype(self.dtype), n_in)
            y = y + _contract(down, b.astype(self.dtype), 1) * jnp.asarray(self.lora.scale, self.dtype)
        y = y.reshape(*lead, *self.features)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[n_in:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _contract(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """x [..., *in] . w [*in, *out] -> [..., *out]."""
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, w, (contract, ((), ())))


def dense(features: int | Sequence[int], axes: Sequence[str | None], *, use_bias: bool, dtype: Dtype,
          param_dtype: Dtype, name: str, in_axes: int = 1, quant: str = "none",
          lora: LoraConfig | None = None) -> Dense:
    """A `Dense` with logical `axes` (in dims, then out dims)."""
    features = tuple(features) if isinstance(features, Sequence) else (features,)
    return Dense(features, tuple(axes), use_bias, in_axes, dtype, param_dtype, quant, lora, name=name)


class Embed(nn.Module):
    """The token embedding table [V, D] (`embedding`, logical axes vocab, embed), stored float or, with
    `quant`, quantised a row per token (`mgjax.quant`)."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: str = "none"

    @nn.compact
    def __call__(self) -> jax.Array:
        """The table [V, D] in `dtype`."""
        return matrix_param(self, "embedding", (self.num_embeddings, self.features), ("vocab", "embed"),
                            nn.initializers.normal(0.02), 1, 1, self.quant, self.param_dtype, self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32 (torch `nn.LayerNorm` semantics)."""

    eps: float
    axis_name: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
                          (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as HF Llama (x.to(dtype) * w) or Gemma ((x * (1 + w)).to(dtype), float32 inside)."""

    eps: float
    gemma: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.gemma else nn.initializers.ones_init()
        w = self.param("scale", nn.with_logical_partitioning(init, ("embed",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        if self.gemma:
            return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
        return w.astype(self.dtype) * y.astype(self.dtype)


def activation(name: str):
    """`silu`, exact `gelu`, `gelu_tanh`, or CLIP's `quick_gelu`."""
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    }[name]


class MLP(nn.Module):
    """fc1 -> activation -> fc2, with biases (CLIP and ConvNeXt blocks)."""

    hidden: int
    act: str
    axes: tuple[str, str]  # (model width, hidden width) logical names
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, self.axes, name="fc1", **kw)(x)
        h = activation(self.act)(h)
        return dense(x.shape[-1], self.axes[::-1], name="fc2", **kw)(h)
