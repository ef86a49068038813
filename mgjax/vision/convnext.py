"""OpenCLIP/timm ConvNeXt trunk (stem + 4 stages) and MGM's multi-stage feature map."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mgjax.config import ConvNextConfig
from mgjax.layers.common import MLP, LayerNorm
from mgjax.sharding import constrain

Dtype = Any


def _conv(features: int, k: int, stride: int, dtype, param_dtype, name: str) -> nn.Conv:
    """A k x k convolution with stride k ("patchify": the stem and the downsamples), VALID padding."""
    return nn.Conv(features, (k, k), strides=stride, padding="VALID", dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None, "conv_in", "conv_out")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution, stride 1, "same" padding.

    Same parameters as a grouped `nn.Conv` (kernel [k, k, 1, C], bias [C]). `impl` "shifted": a sum of
    k*k shifted products (one loop when compiled alone; inside a block, XLA:CPU's dot fusion splits it into
    ~12 partial sums, each the size of x). XLA's SPMD partitioner mis-scales the KERNEL
    gradient of a grouped convolution when a mesh axis replicates it (seen on CPU: exactly x2 with
    tensor=2), and on a CPU the grouped convolution is 10-20x slower (README, Performance); "grouped":
    XLA's grouped convolution, for GPUs and TPUs, correct wherever the tower is frozen (MGM's recipe).
    """

    features: int
    kernel_size: int = 7
    impl: str = "shifted"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, self.features
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(
            in_axis=(0, 1, 2), out_axis=3), (None, None, None, "conv_out")), (k, k, 1, c), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                          (c,), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if self.impl == "grouped":
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=c)
            return y + bias.astype(self.dtype)
        h, w = x.shape[1:3]
        p = k // 2
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        y = sum(xp[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
        return y + bias.astype(self.dtype)


class ConvNextBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4C -> GELU -> Linear C -> * gamma -> drop path -> + x."""

    dim: int
    eps: float
    drop_rate: float
    depthwise_impl: str = "shifted"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = DepthwiseConv(self.dim, impl=self.depthwise_impl, name="conv_dw", **kw)(x)
        h = LayerNorm(self.eps, "conv_out", name="norm", **kw)(h)
        h = MLP(4 * self.dim, "gelu", ("conv_out", "vis_mlp"), name="mlp", **kw)(h)
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.constant(1e-6), ("conv_out",)),
                           (self.dim,), self.param_dtype)
        h = h * gamma.astype(self.dtype)
        if not deterministic and self.drop_rate > 0:
            # timm DropPath: drop the whole residual branch per sample, rescale the kept ones.
            keep = 1.0 - self.drop_rate
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
            h = jnp.where(mask, h / keep, 0).astype(self.dtype)
        return x + h


class ConvNextStage(nn.Module):
    dim: int
    depth: int
    downsample: bool
    eps: float
    drop_rates: tuple[float, ...]
    depthwise_impl: str = "shifted"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.downsample:
            x = LayerNorm(self.eps, "conv_out", name="downsample_0", **kw)(x)
            x = _conv(self.dim, 2, 2, name="downsample_1", **kw)(x)
        for j in range(self.depth):
            x = ConvNextBlock(self.dim, self.eps, self.drop_rates[j], self.depthwise_impl, name=f"blocks_{j}",
                              **kw)(x, deterministic)
        return constrain(x, ("act_batch", None, None, "act_embed"))


class ConvNextTrunk(nn.Module):
    """images [B, S, S, 3] -> the four stage maps [B, S/4/2^s, S/4/2^s, dims[s]] (NHWC)."""

    config: ConvNextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array, deterministic: bool = True) -> list[jax.Array]:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(c.dims[0], 4, 4, name="vision_stem_0", **kw)(pixels.astype(self.dtype))
        x = LayerNorm(c.norm_eps, "conv_out", name="vision_stem_1", **kw)(x)
        # timm: drop-path rates rise linearly over all blocks of all stages.
        rates = np.linspace(0.0, c.drop_path_rate, sum(c.depths)).tolist()
        stages, start = [], 0
        for s, (dim, depth) in enumerate(zip(c.dims, c.depths)):
            x = ConvNextStage(dim, depth, s > 0, c.norm_eps, tuple(rates[start:start + depth]), c.depthwise_impl,
                              name=f"vision_stages_{s}", **kw)(x, deterministic)
            stages.append(x)
            start += depth
        return stages


def multi_stage_map(stages: list[jax.Array]) -> jax.Array:
    """Stage 0 plus stages 1-3 bilinearly upsampled to its size (half-pixel centres, in float32),
    concatenated on channels: [B, H0, W0, sum(dims)] in the stages' dtype."""
    b, h, w, _ = stages[0].shape
    up = [stages[0].astype(jnp.float32)]
    for s in stages[1:]:
        up.append(jax.image.resize(s.astype(jnp.float32), (b, h, w, s.shape[-1]), "bilinear", antialias=False))
    return jnp.concatenate(up, axis=-1).astype(stages[0].dtype)
