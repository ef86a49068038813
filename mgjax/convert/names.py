"""The one name table between mgjax parameter paths and the released PyTorch MGM state dict.

mgjax paths mirror the PyTorch names: `a/b_3/c/kernel` is `a.b.3.c.weight`, with the top-level
prefixes below. Layout rules (docs/mgm_spec.md section 11): Linear [out, in] -> kernel [in, out] (reshaped
to the DenseGeneral shape, e.g. q_proj [D, heads, head_dim]); Conv2d [O, I, kh, kw] ->
[kh, kw, I, O]; Mixtral's per-expert w1/w2/w3 are stacked on a leading expert axis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from flax import traverse_util

from mgjax.config import TWO_INPUT_LINEARS, MGMConfig

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
CONVNEXT_STEM, CONVNEXT_STAGES = CONVNEXT_PREFIX + "vision_stem.", CONVNEXT_PREFIX + "vision_stages."

# Where the separate tower folders keep the same tensors (view prefix -> file prefix).
CLIP_FOLDER_PREFIXES = {CLIP_PREFIX: "vision_model."}
CONVNEXT_FOLDER_PREFIXES = {CONVNEXT_STEM: "visual.trunk.stem.", CONVNEXT_STAGES: "visual.trunk.stages."}

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "lora_a": "lora_A.weight",
         "lora_b": "lora_B.weight"}


@dataclass(frozen=True)
class ParamSpec:
    """One mgjax parameter of `shape` and the PyTorch tensor(s) it is made of.

    `stack` gives the leading axes that stack several PyTorch tensors: () for one tensor, (E,) for
    Mixtral's experts, (L,) for a scanned layer parameter, (L, E) for scanned experts; `torch_keys`
    lists them row-major over those axes.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    torch_keys: tuple[str, ...]
    stack: tuple[int, ...] = ()

    @property
    def _inner(self) -> tuple[int, ...]:
        """The shape of one stacked slice."""
        return self.shape[len(self.stack):]

    def _is_conv(self) -> bool:
        return self.path[-1] == "kernel" and len(self._inner) == 4

    def _is_linear(self) -> bool:
        """A Linear weight [out, in] in PyTorch: a kernel, an expert's weight, or a LoRA adapter (PEFT's lora_A
        [r, in] and lora_B [out, r])."""
        return self.path[-1] in ("kernel", "lora_a", "lora_b") or self.path[-2] == "experts"

    def _n_in(self) -> int:
        """Input dims of a dense kernel: 2 for the attention output ([heads, head_dim, D]) and its lora_a."""
        return 2 if self.path[-2] in TWO_INPUT_LINEARS and self.path[-1] != "lora_b" else 1

    def torch_shape(self) -> tuple[int, ...]:
        """The shape each PyTorch tensor must have."""
        inner = self._inner
        if self._is_conv():  # Conv2d [O, I, kh, kw]
            return (inner[3], inner[2], inner[0], inner[1])
        if self._is_linear():  # Linear [out, in]
            n_in = self._n_in()
            return (math.prod(inner[n_in:]), math.prod(inner[:n_in]))
        if self.path[-1] == "bias":
            return (math.prod(inner),)
        return inner

    def one_to_flax(self, t: np.ndarray) -> np.ndarray:
        """One PyTorch tensor -> its mgjax layout (one slice of a stacked parameter). Shapes are
        checked by the caller (`torch_shape`)."""
        if self._is_conv():
            return t.transpose(2, 3, 1, 0)
        if self._is_linear():
            return t.T.reshape(self._inner)
        return t.reshape(self._inner)

    def to_torch(self, value: np.ndarray) -> list[np.ndarray]:
        """mgjax layout -> the PyTorch tensors, in `torch_keys` order (contiguous copies)."""
        want = self.torch_shape()
        out = []
        for v in value.reshape((-1, *self._inner)):
            if self._is_conv():
                t = v.transpose(3, 2, 0, 1)
            elif self._is_linear():
                t = v.reshape(want[::-1]).T
            else:
                t = v.reshape(want)
            out.append(np.ascontiguousarray(t))
        return out


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
    """A spec for every leaf of the (unboxed) mgjax parameter tree `shapes`, either layout."""
    specs = []
    n_layers, n_experts = config.lm.num_layers, config.lm.num_experts

    def keys(p):
        if "experts" in p:  # llm/layers_i/block_sparse_moe/experts/w{1,2,3}[_lora_{a,b}]
            base = torch_key(p[:-2])
            weight, _, lora = p[-1].partition("_lora_")
            leaf = f"lora_{lora.upper()}.weight" if lora else "weight"
            return [f"{base}.experts.{e}.{weight}.{leaf}" for e in range(n_experts)]
        return [torch_key(p)]

    for p, leaf in traverse_util.flatten_dict(shapes).items():
        shape = tuple(leaf.shape)
        if p[:2] == ("llm", "layers"):  # scanned: one leaf for all layers
            per_layer = [keys(("llm", f"layers_{i}") + p[2:]) for i in range(n_layers)]
            stack = (n_layers, n_experts) if "experts" in p else (n_layers,)
            specs.append(ParamSpec(p, shape, tuple(k for ks in per_layer for k in ks), stack))
        else:
            specs.append(ParamSpec(p, shape, tuple(keys(p)), (n_experts,) if "experts" in p else ()))
    return specs


def is_buffer(key: str) -> bool:
    """Non-persistent PyTorch buffers some saves include: never parameters."""
    return key.endswith((".position_ids", "rotary_emb.inv_freq"))


def ignored(key: str, config: MGMConfig) -> bool:
    """Checkpoint tensors that are present but unused by design (documented in the README).

    CLIP layers past the selected hidden state and its post-LayerNorm never touch MGM's output;
    `position_ids` / `inv_freq` are buffers; a tied LM head may be saved as a copy of the embedding.
    """
    if is_buffer(key):
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
