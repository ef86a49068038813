"""The one name table between mgjax parameter paths and the released PyTorch MGM state dict.

mgjax paths mirror the PyTorch names: `a/b_3/c/kernel` is `a.b.3.c.weight`, with the top-level
prefixes below. Layout rules (MGM_SPEC section 11): Linear [out, in] -> kernel [in, out] (reshaped
to the DenseGeneral shape, e.g. q_proj [D, heads, head_dim]); Conv2d [O, I, kh, kw] ->
[kh, kw, I, O]; Mixtral's per-expert w1/w2/w3 are stacked on a leading expert axis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mgjax.config import MGMConfig

# mgjax top-level module -> PyTorch prefix (longest match first).
PREFIXES = (
    ("llm/lm_head", "lm_head"),
    ("llm", "model"),
    ("vision_tower_aux", "model.vision_tower_aux"),
    ("vision_tower", "model.vision_tower.vision_tower.vision_model"),
    ("vlm_uni_query_projector", "model.vlm_uni_query_projector"),
    ("vlm_uni_aux_projector", "model.vlm_uni_aux_projector"),
    ("vlm_uni_val_projector", "model.vlm_uni_val_projector"),
    ("mm_projector", "model.mm_projector"),
)
CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
CONVNEXT_PREFIX = "model.vision_tower_aux."

# Where the separate tower folders keep the same tensors (view prefix -> file prefix).
CLIP_FOLDER_PREFIXES = {CLIP_PREFIX: "vision_model."}
CONVNEXT_FOLDER_PREFIXES = {CONVNEXT_PREFIX + "vision_stem.": "visual.trunk.stem.",
                            CONVNEXT_PREFIX + "vision_stages.": "visual.trunk.stages."}

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


@dataclass(frozen=True)
class ParamSpec:
    """One mgjax parameter and the PyTorch tensor(s) it is made of."""

    path: tuple[str, ...]
    torch_keys: tuple[str, ...]  # one, or one per expert (stacked)

    def torch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape each PyTorch tensor must have for the mgjax parameter of `shape`."""
        if len(self.torch_keys) > 1:  # one expert's Linear [out, in] of the stacked [E, in, out]
            return (shape[2], shape[1])
        if self.path[-1] == "kernel":
            if len(shape) == 4:  # Conv2d
                return (shape[3], shape[2], shape[0], shape[1])
            n_in = 2 if self.path[-2] in ("o_proj", "out_proj") else 1  # [heads, head_dim, D] kernels
            return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
        if self.path[-1] == "bias":
            return (math.prod(shape),)
        return tuple(shape)

    def to_flax(self, tensors: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """PyTorch layout -> mgjax layout of `shape` (a view or a small copy, dtype unchanged)."""
        t = tensors[0]
        if len(tensors) > 1:  # stacked experts: each [out, in]
            return np.stack([x.T for x in tensors]).reshape(shape)
        if self.path[-1] == "kernel":
            if t.ndim == 4:  # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
                return t.transpose(2, 3, 1, 0)
            return t.T.reshape(shape)
        return t.reshape(shape)


def torch_key(path: Sequence[str]) -> str:
    """mgjax path -> PyTorch name of the released state dict."""
    joined = "/".join(path)
    for ours, theirs in PREFIXES:
        if joined == ours or joined.startswith(ours + "/"):
            rest = list(path[len(ours.split("/")):])
            break
    else:
        raise KeyError(f"no PyTorch name for mgjax parameter {joined}")
    if rest:
        rest[-1] = _LEAF.get(rest[-1], rest[-1])
    rest = [re.sub(r"_(\d+)$", r".\1", p) for p in rest]
    return ".".join([theirs, *rest])


def param_specs(shapes: dict, config: MGMConfig) -> list[ParamSpec]:
    """A spec for every leaf of the (unboxed) mgjax parameter tree `shapes`."""
    specs = []

    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
                continue
            p = path + (k,)
            if "experts" in p:  # llm/layers_i/block_sparse_moe/experts/w{1,2,3}
                base = torch_key(p[:-2])
                keys = tuple(f"{base}.experts.{e}.{p[-1]}.weight" for e in range(config.lm.num_experts))
            else:
                keys = (torch_key(p),)
            specs.append(ParamSpec(p, keys))

    walk(shapes, ())
    return specs


def ignored(key: str, config: MGMConfig) -> bool:
    """Checkpoint tensors that are present but unused by design (documented in the README).

    CLIP layers past the selected hidden state and its post-LayerNorm never touch MGM's output;
    `position_ids` / `inv_freq` are buffers; a tied LM head may be saved as a copy of the embedding.
    """
    if key.endswith(".position_ids") or key.endswith("rotary_emb.inv_freq"):
        return True
    if key == "lm_head.weight" and config.lm.tie_word_embeddings:
        return True
    if key.startswith(CLIP_PREFIX):
        rest = key[len(CLIP_PREFIX):]
        if rest.startswith("post_layernorm."):
            return True
        m = re.match(r"encoder\.layers\.(\d+)\.", rest)
        return bool(m) and int(m.group(1)) >= config.clip_layers_used
    return False
