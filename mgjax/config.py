"""Frozen model configs and their construction from released `config.json` files.

A released MGM `config.json` is the base LLM's HF config plus the `mm_*` / `image_*` keys
(docs/mgm_spec.md section 1). The tower architectures are not in it: they come from the tower folders
(`CLIPConfig.from_hf`, `convnext_from_open_clip`) or from the released presets (`mgjax.presets`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from mgjax.data.templates import TEMPLATES
from mgjax.errors import MGJaxError
from mgjax.families import ARCHS, detect_template

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

FAMILIES = tuple(ARCHS)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
REMAT_POLICIES = ("none", "dots", "full")
MOE_IMPLS = ("auto", "dense", "ragged")
ATTENTION_IMPLS = ("auto", "xla", "causal", "cudnn", "splash")
# What "auto" picks on each platform the programs are built for (`mgjax.sharding.target_platform`): the fast
# path where one exists; on a CPU the reference's math in causal query blocks (splash only runs interpreted
# there) and the dense experts (ragged_dot lowers to a masked product over every group).
AUTO_IMPLS = {"attention": {"tpu": "splash", "gpu": "cudnn", "cpu": "causal"},
              "moe": {"tpu": "ragged", "gpu": "ragged", "cpu": "dense"}}
DEPTHWISE_IMPLS = ("shifted", "grouped")
# The attention output projections (LLM, CLIP): the linear layers whose kernel contracts two input axes,
# [heads, head_dim, D]; every other kernel has one.
TWO_INPUT_LINEARS = ("o_proj", "out_proj")
# Weight-only quantisation of the LLM's matrices (`mgjax.quant`): int8 per output channel, int4 in groups.
QUANT_MODES = ("none", "int8", "int4")
# What the original's `find_all_linear_names` gives PEFT: every linear layer of the LLM but its head (attention,
# MLP, Mixtral's router and experts), as patterns over mgjax's linear-layer paths (`LoraConfig.targets`).
LORA_TARGETS = ("llm/*self_attn/*", "llm/*mlp/*", "llm/*block_sparse_moe/*")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters as PEFT adds them (the original's `--lora_enable`): a linear layer y = x W becomes
    y = x W + (alpha / rank) * dropout(x) A B, A [in, rank] (PEFT's kaiming-uniform init), B [rank, out] (zeros).

    `targets`: fnmatch patterns (`*` crosses `/`) over the paths of the LLM's linear layers: a Dense module's
    path (`llm/layers/self_attn/q_proj`, `llm/layers_3/mlp/down_proj`, `llm/lm_head`) or an expert weight
    (`llm/layers/block_sparse_moe/experts/w1`). Defaults: the original's choice (`LORA_TARGETS`); r, alpha and
    dropout: its TrainingArguments' defaults."""

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0 or not self.targets:
            raise MGJaxError(f"LoRA: rank {self.rank} must be >= 1, dropout {self.dropout} in [0, 1), and targets "
                             "must name at least one pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, path: str) -> bool:
        """Whether the linear layer at `path` ("llm/layers/self_attn/q_proj") gets adapters."""
        return any(fnmatch.fnmatchcase(path, t) for t in self.targets)


@dataclass(frozen=True)
class CLIPConfig:
    """HF `CLIPVisionModel` (quick_gelu, pre-LN)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side: 24 for ViT-L/14-336."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        d = d.get("vision_config", d)  # a full CLIPModel config nests the vision part
        act = d.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise MGJaxError(f"CLIP config: hidden_act {act!r} is not supported (MGM's tower uses 'quick_gelu')")
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            image_size=d["image_size"],
            patch_size=d["patch_size"],
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        )


@dataclass(frozen=True)
class ConvNextConfig:
    """timm ConvNeXt trunk as OpenCLIP's `convnext_large_d_320` builds it."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    norm_eps: float = 1e-6
    # Stochastic depth of the released training recipe; only active when the tower runs with
    # `deterministic=False` (docs/mgm_spec.md section 4: inference is deterministic).
    drop_path_rate: float = 0.1
    # The 7x7 depthwise convolutions: "shifted" (49 shifted products: fastest on a CPU, and the only one
    # with a right kernel gradient under SPMD) or "grouped" (XLA's grouped convolution: GPU / TPU, frozen
    # tower). See `mgjax.vision.convnext.DepthwiseConv`. Equal up to rounding.
    depthwise_impl: str = "shifted"

    def __post_init__(self):
        if self.depthwise_impl not in DEPTHWISE_IMPLS:
            raise MGJaxError(f"ConvNextConfig.depthwise_impl {self.depthwise_impl!r} is not one of "
                             f"{', '.join(DEPTHWISE_IMPLS)}")

    @property
    def out_channels(self) -> int:
        """Channels of the concatenated multi-stage map (2880 for ConvNeXt-L)."""
        return sum(self.dims)


# timm model names that OpenCLIP configs may name, with their trunk shapes.
CONVNEXT_TIMM = {
    "convnext_large": ConvNextConfig(),
    "convnext_base": ConvNextConfig(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_xxlarge": ConvNextConfig(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072)),
}


def convnext_from_shapes(shapes: Mapping[str, tuple[int, ...]], drop_path_rate: float = 0.1) -> ConvNextConfig:
    """The trunk's depths and dims from its weight shapes (trunk-relative names such as
    `stages.2.blocks.5.gamma`): the shapes determine a ConvNeXt completely."""
    depths, dims = [], []
    for s in range(4):
        blocks = {k.split(".")[3] for k in shapes if k.startswith(f"stages.{s}.blocks.")}
        if not blocks:
            raise MGJaxError(f"ConvNeXt weights have no blocks for stage {s} (looked for 'stages.{s}.blocks.*')")
        depths.append(len(blocks))
        dims.append(shapes[f"stages.{s}.blocks.0.gamma"][0])
    return ConvNextConfig(depths=tuple(depths), dims=tuple(dims), drop_path_rate=drop_path_rate)


def convnext_from_open_clip(d: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]] | None) -> ConvNextConfig:
    """ConvNeXt config from an `open_clip_config.json`, falling back to the weight shapes
    (`convnext_from_shapes`) when the config names a timm model this table does not know."""
    vision = d.get("model_cfg", d).get("vision_cfg", {})
    name = vision.get("timm_model_name", "")
    drop = vision.get("timm_drop_path", 0.1) or 0.0
    if name in CONVNEXT_TIMM:
        return dataclasses.replace(CONVNEXT_TIMM[name], drop_path_rate=drop)
    if not shapes:
        raise MGJaxError(f"open_clip_config.json names timm model {name!r}, which mgjax does not know, "
                         "and no tower weights were found to read its shape from")
    return convnext_from_shapes(shapes, drop)


@dataclass(frozen=True)
class LMConfig:
    """One decoder for the Llama family (Vicuna, Llama-3, Yi), Gemma and Mixtral."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # "gelu" is exact (erf) GELU, "gelu_tanh" the tanh approximation (Gemma: see `from_hf`).
    activation: str = "silu"
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    max_position_embeddings: int = 4096
    # Layout, not architecture: decoder layers under one `nn.scan` with parameters stacked on a leading
    # `layers` axis (`llm/layers/...`) instead of `llm/layers_{i}/...`. Checkpoints record it.
    scan_layers: bool = False
    # What the backward pass recomputes of each decoder layer: none | dots (keeps matmul outputs) | full.
    remat: str = "none"
    # How Mixtral's experts run: "dense" (every expert on every token, weighted 0 where not routed: the
    # reference) or "ragged" (each token only through its top-k experts, one `jax.lax.ragged_dot` per
    # projection: k / E of the FLOPs where XLA has a grouped matmul, GPU and TPU; on CPU jax lowers
    # ragged_dot to a masked product over every group, k times the dense path's work). Equal up to rounding.
    moe_impl: str = "auto"
    # Training's loss: the LM head and cross-entropy run over chunks of this many positions, each chunk's
    # float32 logits recomputed in the backward pass instead of kept ([B, L, V] x 4 bytes, twice, otherwise:
    # 1 GB per 2048-token row at Llama-3's 128k vocabulary). 0: one [B, L, V] head. Equal up to rounding.
    loss_chunk: int = 0
    # Attention without a cache: "xla" (the einsum reference), "causal" (CPU: the reference per block of 128
    # queries over only the keys they can see; also generation's prefill), "cudnn" (GPU:
    # jax.nn.dot_product_attention's cuDNN flash kernel) or "splash" (TPU: Pallas splash attention). Calls
    # with a cache take the reference or, see `cache_block`, its blocked form. "auto": `AUTO_IMPLS` for the
    # platform compiled for.
    attention_impl: str = "auto"
    # Attention over a KV cache (generation) in blocks of this many slots, visiting only the blocks that
    # hold tokens (a running softmax; not the room left for later tokens, nor padding every row skips):
    # a batch-8 decode step with 1792 slots of which 800 are used takes half the time on a CPU. Caches
    # shorter than a block, and 0, attend over every slot at every step. Equal up to rounding.
    cache_block: int = 256
    # LoRA adapters on the linear layers `lora.targets` names (None: none); their parameters sit beside each
    # adapted weight: `{layer}/lora_a`, `{layer}/lora_b` (experts: `experts/w1_lora_a`, ...).
    lora: LoraConfig | None = None
    # The matrices (linear layers, experts, embedding) stored int8 / int4 with float scales (`mgjax.quant`).
    quant: str = "none"

    def impls(self, platform: str) -> tuple[str, str]:
        """(attention_impl, moe_impl) as they run on `platform` ("auto" resolved by `AUTO_IMPLS`)."""
        return tuple(AUTO_IMPLS[k].get(platform, AUTO_IMPLS[k]["cpu"]) if v == "auto" else v
                     for k, v in (("attention", self.attention_impl), ("moe", self.moe_impl)))

    @property
    def gemma_norm(self) -> bool:
        """RMSNorm scales by (1 + w) (Gemma)."""
        return ARCHS[self.family].gemma_norm

    @property
    def scale_embeddings(self) -> bool:
        """The input embeddings are multiplied by sqrt(hidden_size) (Gemma)."""
        return ARCHS[self.family].scale_embeddings

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise MGJaxError(f"LMConfig.family {self.family!r} is not one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            raise MGJaxError(f"LMConfig.activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise MGJaxError(f"LMConfig.remat {self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if self.moe_impl not in MOE_IMPLS:
            raise MGJaxError(f"LMConfig.moe_impl {self.moe_impl!r} is not one of {', '.join(MOE_IMPLS)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise MGJaxError(f"LMConfig.attention_impl {self.attention_impl!r} is not one of "
                             f"{', '.join(ATTENTION_IMPLS)}")
        if self.quant not in QUANT_MODES:
            raise MGJaxError(f"LMConfig.quant {self.quant!r} is not one of {', '.join(QUANT_MODES)}")
        if self.cache_block < 0:
            raise MGJaxError(f"LMConfig.cache_block {self.cache_block}: must be >= 0 (0: no blocks)")
        if self.loss_chunk < 0:
            raise MGJaxError(f"LMConfig.loss_chunk {self.loss_chunk}: must be >= 0 (0: no chunking)")
        if self.num_heads % self.num_kv_heads:
            raise MGJaxError(f"LMConfig: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if (self.family == "mixtral") != (self.num_experts > 0):
            raise MGJaxError("LMConfig: num_experts must be > 0 exactly when family is 'mixtral'")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise MGJaxError(f"LMConfig: num_experts_per_tok {self.num_experts_per_tok} must be in "
                             f"1..{self.num_experts}")

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "LMConfig":
        """From an HF LLM config (the LLM part of a released MGM `config.json`)."""
        family = family_of(d)
        arch = ARCHS[family]
        # transformers >= 5 writes RoPE settings as `rope_parameters` (theta and scaling in one dict);
        # released MGM config.json files (transformers 4.x) have top-level `rope_theta` / `rope_scaling`.
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            raise MGJaxError(f"config.json: RoPE scaling {scaling!r} is not supported "
                             "(no released MGM model uses it)")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        if family == "gemma":
            # transformers <= 4.39 (which trained MGM-2B) ran `hidden_act="gelu"` as exact GELU;
            # `hidden_activation`, when present, is the explicit choice of later versions.
            act = d.get("hidden_activation") or d.get("hidden_act", "gelu")
        else:
            act = d.get("hidden_act", arch.activation)
        act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act, act)
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            intermediate_size=d["intermediate_size"],
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
            norm_eps=float(d.get("rms_norm_eps", arch.norm_eps)),
            activation=act,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", arch.tie_word_embeddings)),
            num_experts=d.get("num_local_experts", 0) if family == "mixtral" else 0,
            num_experts_per_tok=d.get("num_experts_per_tok", 0) if family == "mixtral" else 0,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
        )


def family_of(d: Mapping[str, Any]) -> str:
    """LLM family from `model_type` / `architectures` of a released or base config."""
    mt = str(d.get("model_type", "")).lower()
    arch = " ".join(d.get("architectures") or []).lower()
    if "mixtral" in mt or "mixtral" in arch:
        return "mixtral"
    if "gemma" in mt or "gemma" in arch:
        return "gemma"
    if mt in ("mgm", "mini_gemini", "llama", "llava", "llava_llama") or "llama" in arch:
        return "llama"
    raise MGJaxError(f"config.json: model_type {d.get('model_type')!r} / architectures {d.get('architectures')!r} "
                     "is not an MGM model (expected mgm, mgm_gemma, mgm_mixtral or mini_gemini)")


@dataclass(frozen=True)
class MGMConfig:
    """The whole model: towers, mining, projector, LLM, and how inputs are built."""

    lm: LMConfig = field(default_factory=LMConfig)
    vision: CLIPConfig = field(default_factory=CLIPConfig)
    vision_aux: ConvNextConfig = field(default_factory=ConvNextConfig)
    mm_hidden_size: int = 1024
    mm_hidden_size_aux: int = 2880
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "mlp2x_gelu"
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    image_aspect_ratio: str = "pad"
    max_length: int = 2048
    padding_side: str = "right"
    template: str = "vicuna_v1"
    # Tower folders as config.json names them (relative paths in the releases).
    vision_tower: str = ""
    vision_tower_aux: str = ""

    def __post_init__(self):
        v = self.vision
        checks = [
            (self.mm_hidden_size == v.hidden_size,
             f"mm_hidden_size {self.mm_hidden_size} != CLIP hidden_size {v.hidden_size}"),
            (self.mm_hidden_size_aux == self.vision_aux.out_channels,
             f"mm_hidden_size_aux {self.mm_hidden_size_aux} != sum of ConvNeXt dims {self.vision_aux.dims}"),
            (self.select_feature == "patch", f"mm_vision_select_feature {self.select_feature!r} (only 'patch')"),
            (self.projector_type == "mlp2x_gelu", f"mm_projector_type {self.projector_type!r} (only 'mlp2x_gelu')"),
            (self.padding_side in ("left", "right"), f"tokenizer_padding_side {self.padding_side!r}"),
            (self.image_grid >= 1, f"image_grid {self.image_grid}"),
            (not self.image_global or self.image_grid > 1, "image_global needs image_grid > 1"),
            (-v.num_layers - 1 <= self.select_layer <= v.num_layers,
             f"mm_vision_select_layer {self.select_layer} for a {v.num_layers}-layer CLIP"),
            (self.template in TEMPLATES, f"template {self.template!r} is not one of {', '.join(TEMPLATES)}"),
        ]
        for ok, what in checks:
            if not ok:
                raise MGJaxError(f"MGMConfig: {what}")
        stage0 = self.image_size_aux // 4
        if stage0 % (self.image_grid * v.grid):
            raise MGJaxError(f"MGMConfig: the ConvNeXt stage-0 map ({stage0} for image_size_aux {self.image_size_aux}) "
                             f"does not split into {self.image_grid * v.grid} windows per side")

    def plain(self) -> "MGMConfig":
        """The model without LoRA adapters and quantisation: what releases and converted checkpoints hold."""
        return dataclasses.replace(self, lm=dataclasses.replace(self.lm, lora=None, quant="none"))

    @property
    def clip_layers_used(self) -> int:
        """Encoder layers that feed hidden state `select_layer` (23 of 24 for -2)."""
        k = self.select_layer
        return k if k >= 0 else self.vision.num_layers + 1 + k

    @property
    def image_size(self) -> int:
        """Side of one low-res CLIP input (a tile in HD)."""
        return self.vision.image_size

    @property
    def tokens_per_view(self) -> int:
        """Visual tokens of one CLIP view (576 for ViT-L/14-336)."""
        return self.vision.grid**2

    @property
    def num_views(self) -> int:
        """CLIP views per image: 1, or grid^2 tiles (+ the global view)."""
        return 1 if self.image_grid == 1 else self.image_grid**2 + int(self.image_global)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one `<image>` expands to (576, or 2880 for HD)."""
        return self.tokens_per_view * self.num_views

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], vision: CLIPConfig | None = None,
                vision_aux: ConvNextConfig | None = None, template: str | None = None) -> "MGMConfig":
        """From a released MGM `config.json` (as a dict) plus the tower configs.

        Towers left None take the released architectures (CLIP ViT-L/14-336, ConvNeXt-L). `template`
        None takes the one the model family implies (`families.detect_template` without a tokenizer
        or folder name; loaders pass what they detect from the checkpoint's files).
        """
        lm = LMConfig.from_hf(d)
        if "mm_hidden_size" not in d:
            raise MGJaxError("config.json has no 'mm_hidden_size': this is a plain LLM config, not an MGM checkpoint")
        vision = vision or CLIPConfig()
        vision_aux = vision_aux or ConvNextConfig()
        return cls(
            lm=lm,
            vision=vision,
            vision_aux=vision_aux,
            mm_hidden_size=d["mm_hidden_size"],
            mm_hidden_size_aux=d.get("mm_hidden_size_aux", vision_aux.out_channels),
            select_layer=d.get("mm_vision_select_layer", -2),
            select_feature=d.get("mm_vision_select_feature", "patch"),
            projector_type=d.get("mm_projector_type", "mlp2x_gelu"),
            image_size_aux=d.get("image_size_aux", 768),
            image_grid=d.get("image_grid", 1),
            image_global=bool(d.get("image_global", False)),
            image_aspect_ratio=d.get("image_aspect_ratio", "pad"),
            max_length=d.get("tokenizer_model_max_length") or 2048,
            padding_side=d.get("tokenizer_padding_side", "right"),
            template=template or detect_template(lm.family, None, ())[0],
            vision_tower=d.get("mm_vision_tower", ""),
            vision_tower_aux=d.get("mm_vision_tower_aux", ""),
        )


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes for the axes (data, fsdp, tensor, expert); one of them may be -1 (the rest)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor, self.expert]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise MGJaxError(f"mesh {self}: sizes must be positive, with at most one -1")
        fixed = math.prod(s for s in sizes if s != -1)
        if num_devices % fixed:
            raise MGJaxError(f"mesh {self} needs a multiple of {fixed} devices, there are {num_devices}")
        sizes = [num_devices // fixed if s == -1 else s for s in sizes]
        if math.prod(sizes) != num_devices:
            raise MGJaxError(f"mesh {self} covers {math.prod(sizes)} devices, there are {num_devices}")
        return tuple(sizes)

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """`"fsdp=-1,tensor=2"` -> MeshConfig(data=1, fsdp=-1, tensor=2, expert=1); unnamed axes are 1."""
        sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
        for part in filter(None, text.replace(" ", "").split(",")):
            name, _, value = part.partition("=")
            if name not in sizes or not value.lstrip("-").isdigit():
                raise MGJaxError(f"mesh {text!r}: expected NAME=SIZE,... with NAME in data, fsdp, tensor, expert")
            sizes[name] = int(value)
        return cls(**sizes)


_HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def config_to_hf(config: MGMConfig) -> dict:
    """The released `config.json` keys that `MGMConfig.from_hf` reads (the towers' architectures live in
    their folders, named by `mm_vision_tower*`, and the template is the tokenizer's business)."""
    lm = config.lm
    d = {"model_type": ARCHS[lm.family].model_type, "architectures": [ARCHS[lm.family].architecture],
         "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size, "num_hidden_layers": lm.num_layers,
         "num_attention_heads": lm.num_heads, "num_key_value_heads": lm.num_kv_heads, "head_dim": lm.head_dim,
         "intermediate_size": lm.intermediate_size, "rope_theta": lm.rope_theta, "rms_norm_eps": lm.norm_eps,
         "hidden_act": _HF_ACTIVATIONS[lm.activation], "tie_word_embeddings": lm.tie_word_embeddings,
         "max_position_embeddings": lm.max_position_embeddings}
    if lm.family == "gemma":
        d["hidden_activation"] = d["hidden_act"]
    if lm.num_experts:
        d.update(num_local_experts=lm.num_experts, num_experts_per_tok=lm.num_experts_per_tok)
    d.update(mm_hidden_size=config.mm_hidden_size, mm_hidden_size_aux=config.mm_hidden_size_aux,
             mm_vision_select_layer=config.select_layer, mm_vision_select_feature=config.select_feature,
             mm_projector_type=config.projector_type, image_size_aux=config.image_size_aux,
             image_grid=config.image_grid, image_global=config.image_global,
             image_aspect_ratio=config.image_aspect_ratio, tokenizer_model_max_length=config.max_length,
             tokenizer_padding_side=config.padding_side, mm_vision_tower=config.vision_tower,
             mm_vision_tower_aux=config.vision_tower_aux, mm_use_im_start_end=False, mm_use_im_patch_token=False)
    return d


def config_to_dict(config: MGMConfig) -> dict:
    """A JSON-ready dict (`mgjax_config.json`); `config_from_dict` inverts it."""
    return dataclasses.asdict(config)


def config_from_dict(d: Mapping[str, Any]) -> MGMConfig:
    try:
        fields = dict(d)
        # mgjax <= 0.1 stored the family-derived `scale_embeddings` as a field
        lm = {k: v for k, v in fields["lm"].items() if k != "scale_embeddings"}
        if lm.get("lora") is not None:
            lm["lora"] = LoraConfig(**{**lm["lora"], "targets": tuple(lm["lora"]["targets"])})
        fields["lm"] = LMConfig(**lm)
        fields["vision"] = CLIPConfig(**fields["vision"])
        aux = dict(fields["vision_aux"])
        fields["vision_aux"] = ConvNextConfig(**{**aux, "depths": tuple(aux["depths"]), "dims": tuple(aux["dims"])})
        return MGMConfig(**fields)
    except (KeyError, TypeError) as e:
        raise MGJaxError(f"mgjax_config.json: not a config this version of mgjax can read ({e})") from None
