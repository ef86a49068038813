"""LoRA adapters as parameters: which leaves they are, their start values, merging them into the weights
they adapt, and PEFT's names for them.

An adapted linear layer keeps its weight and gains two leaves beside it (`LMConfig.lora`, built by
`layers.common.Dense` and `layers.mlp.Experts`): `{layer}/lora_a` [*in, r] and `{layer}/lora_b` [r, *out]
next to `{layer}/kernel`, or `experts/w1_lora_a` [E, D, r] and `experts/w1_lora_b` [E, r, F] next to
`experts/w1` (scanned layers: a leading [L] axis on all of them). PEFT's names are the released weight's
name with `.weight` replaced by `.lora_A.weight` / `.lora_B.weight` ([r, in] and [out, r]).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from mgjax.config import LORA_TARGETS, TWO_INPUT_LINEARS, LoraConfig, MGMConfig
from mgjax.errors import MGJaxError

# PEFT's "base_model.model." before the model's own names, in adapter_model.* and non_lora_trainables.bin
PEFT_PREFIX = "base_model.model."
PEFT_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def is_adapter(path: Sequence[str]) -> bool:
    return path[-1].endswith(("lora_a", "lora_b"))


def adapter_paths(path: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(A path, B path) of the adapters of the weight at `path` (`.../q_proj/kernel`, `.../experts/w1`)."""
    path = tuple(path)
    if path[-1] == "kernel":
        return (*path[:-1], "lora_a"), (*path[:-1], "lora_b")
    return (*path[:-1], f"{path[-1]}_lora_a"), (*path[:-1], f"{path[-1]}_lora_b")


def base_path(adapter: Sequence[str]) -> tuple[str, ...]:
    """The weight an adapter leaf adapts (`adapter_paths` inverted)."""
    *head, leaf = adapter
    name = leaf.rsplit("lora_", 1)[0].rstrip("_")
    return (*head, name or "kernel")


def adapted(params: dict) -> dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]]:
    """{weight path: (A path, B path)} of every adapted weight of a (flat-able) parameter tree."""
    flat = traverse_util.flatten_dict(params)
    return {base_path(p): adapter_paths(base_path(p)) for p in flat if p[-1].endswith("lora_a")}


def layer_path(weight: Sequence[str]) -> str:
    """The path `LoraConfig.targets` are matched against: the Dense module's, or an expert weight's own."""
    return "/".join(weight[:-1] if weight[-1] == "kernel" else weight)


def check_targets(params: dict, lora: LoraConfig) -> None:
    """Raises when a target pattern adapts nothing (a typo would otherwise train without adapters there); the
    defaults (`LORA_TARGETS`) cover every family, so only adapting nothing at all is an error for them."""
    layers = [layer_path(p) for p in adapted(params)]
    for t in lora.targets:
        if not any(fnmatch.fnmatchcase(layer, t) for layer in layers) and (t not in LORA_TARGETS or not layers):
            linear = sorted({layer_path(p) for p in traverse_util.flatten_dict(params)
                             if p[0] == "llm" and (p[-1] == "kernel" or p[-2:-1] == ("experts",))})
            raise MGJaxError(f"model.lora.targets: {t!r} matches none of the LLM's linear layers "
                             f"({', '.join(linear[:6])}{' ...' if len(linear) > 6 else ''}); patterns are fnmatch "
                             "globs over these paths")


def merge(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """weight [*lead, *in, *out] + scale * A B, A [*lead, *in, r], B [*lead, r, *out], in float32, cast back."""
    n_out = weight.ndim - (a.ndim - 1)
    n_lead = b.ndim - 1 - n_out
    lead, r = a.shape[:n_lead], a.shape[-1]
    a2 = jnp.reshape(a, (*lead, -1, r)).astype(jnp.float32)
    b2 = jnp.reshape(b, (*lead, r, -1)).astype(jnp.float32)
    delta = jnp.reshape(jnp.matmul(a2, b2), weight.shape)
    return (weight.astype(jnp.float32) + scale * delta).astype(weight.dtype)


def merged_params(params: dict, scale: float) -> dict:
    """The tree with every adapter merged into its weight and removed: the plain model's parameters."""
    flat = traverse_util.flatten_dict(params)
    for weight, (a, b) in adapted(params).items():
        flat[weight] = jax.jit(merge, static_argnums=3)(flat[weight], flat.pop(a), flat.pop(b), scale)
    return traverse_util.unflatten_dict(flat)


def init_adapters(abstract: dict, key: jax.Array, shardings: dict | None = None) -> dict:
    """Start values of the adapter leaves of `abstract` (ShapeDtypeStructs): A as PEFT draws it,
    U(+-1 / sqrt(fan_in)), one key per leaf path; B zeros (the adapted model starts as the base model)."""
    flat = traverse_util.flatten_dict(abstract)
    placed = None if shardings is None else traverse_util.flatten_dict(shardings)
    out = {}
    for path, a in flat.items():
        if not is_adapter(path):
            raise MGJaxError(f"init_adapters: {'/'.join(path)} is not an adapter")
        sharding = None if placed is None else placed[path]
        if path[-1].endswith("lora_b"):
            out[path] = jax.jit(lambda s=a: jnp.zeros(s.shape, s.dtype), out_shardings=sharding)()
            continue
        fan_in = _fan_in(path, a.shape)
        leaf_key = jax.random.fold_in(key, _path_seed(path))
        out[path] = jax.jit(lambda k, s=a, bound=1 / math.sqrt(fan_in): jax.random.uniform(
            k, s.shape, s.dtype, -bound, bound), out_shardings=sharding)(leaf_key)
    return traverse_util.unflatten_dict(out)


def _fan_in(path: Sequence[str], shape: Sequence[int]) -> int:
    """The adapted layer's input size: A is [(L,) (E,) *in, r]; attention's output projection has 2 input axes."""
    n_in = 2 if path[-2] in TWO_INPUT_LINEARS else 1
    return math.prod(shape[-1 - n_in:-1])


def _path_seed(path: Sequence[str]) -> int:
    return int.from_bytes("/".join(path).encode()[-8:].rjust(8, b"\0"), "little") % (1 << 31)


def peft_target_modules(adapters: dict, config: MGMConfig) -> list[str]:
    """The modules the adapter tree `adapters` adapts, as PEFT names them in the base model
    (`model.layers.0.self_attn.q_proj`, ...): adapter_config.json's `target_modules` (full names, so that PEFT
    adapts exactly these)."""
    from mgjax.convert.names import param_specs

    return sorted({k.removesuffix(".lora_A.weight") for s in param_specs(adapters, config)
                   if s.path[-1].endswith("lora_a") for k in s.torch_keys})


def peft_config(lora: LoraConfig, target_modules: list[str], base: str) -> dict:
    """adapter_config.json as PEFT writes it for these adapters."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "base_model_name_or_path": base,
            "revision": None}


def read_peft_config(d: dict, where: str) -> tuple[int, float]:
    """(rank, scale) of an adapter_config.json, after checking it is a plain LoRA mgjax can merge."""
    if d.get("peft_type", "LORA") != "LORA":
        raise MGJaxError(f"{where}: peft_type {d.get('peft_type')!r}: only LoRA adapters load")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if d.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if d.get(k)]
    if d.get("bias", "none") != "none":
        unsupported.append(f"bias={d['bias']!r}")
    if unsupported:
        raise MGJaxError(f"{where}: {', '.join(unsupported)} is not supported (mgjax merges plain LoRA: "
                         "W + lora_alpha / r * B A)")
    r, alpha = int(d["r"]), float(d["lora_alpha"])
    return r, alpha / (math.sqrt(r) if d.get("use_rslora") else r)
