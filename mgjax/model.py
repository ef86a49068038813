"""MGM: images -> towers -> patch info mining -> projector -> spliced into the LLM's embeddings."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgjax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MGMConfig
from mgjax.lm.decoder import Decoder
from mgjax.mining import MLPProjector, UniProjector, visual_tokens
from mgjax.sharding import DEFAULT_RULES, constrain, param_shardings
from mgjax.vision.clip import CLIPVisionTower
from mgjax.vision.convnext import ConvNextTrunk, multi_stage_map

Dtype = Any


class SplicePlan(NamedTuple):
    """Where each position of the merged sequence [B, L] comes from.

    token: index into the prompt ids [B, T]; image_row: row of the flattened image embeddings
    [num_images * N, D]; is_image / valid: bool; positions: rotary positions (0.. per row, or per
    segment of a packed row); segments: int segment ids of a packed row (0 at padding; a visual token
    has its placeholder's), None without packing.
    """

    token: jax.Array
    image_row: jax.Array
    is_image: jax.Array
    valid: jax.Array
    positions: jax.Array
    segments: jax.Array | None = None


def merged_lengths(input_ids, attention_mask, tokens_per_image: int):
    """Length of each row after expanding its placeholders (before truncation): int [B]."""
    mask = attention_mask.astype(bool)
    is_img = (input_ids == IMAGE_TOKEN_INDEX) & mask
    return mask.sum(-1) + is_img.sum(-1) * (tokens_per_image - 1)


def splice_plan(input_ids: jax.Array, attention_mask: jax.Array, tokens_per_image: int, length: int,
                padding_side: str, segment_ids: jax.Array | None = None) -> SplicePlan:
    """The original's `prepare_inputs_labels_for_multimodal` as fixed-shape index arithmetic.

    Drops masked-out ids, expands each -200 into `tokens_per_image` rows of the next image (images are
    consumed in order across the batch; a row without a placeholder still consumes one), truncates to
    `length` and pads on `padding_side`. No Python loop over data: it traces once per shape.

    `segment_ids` int [B, T] (packed rows, as the data pipeline makes them: 0 = padding, 1..k = the k-th
    sample, each a contiguous run): the plan carries them over the merged sequence and restarts the
    positions at 0 for each segment. Image consumption is per row, as the pipeline fills the slots: a
    row's placeholders in order, or one (unused) image when the whole row has none; a text-only sample
    packed beside image samples consumes nothing.
    """
    mask = attention_mask.astype(bool)
    is_img = (input_ids == IMAGE_TOKEN_INDEX) & mask
    sizes = jnp.where(mask, jnp.where(is_img, tokens_per_image, 1), 0)
    start = jnp.cumsum(sizes, axis=1) - sizes  # [B, T] first merged position of each id
    total = jnp.minimum(sizes.sum(1), length)  # [B]
    n_img = is_img.sum(1)
    consumed = jnp.maximum(n_img, 1)
    first_image = jnp.cumsum(consumed) - consumed  # [B] index of the row's first image
    image_ord = jnp.cumsum(is_img, axis=1) - is_img  # [B, T] images before this id in its row

    q = jnp.broadcast_to(jnp.arange(length), (input_ids.shape[0], length))
    if padding_side == "left":
        q = q - (length - total)[:, None]
    valid = (q >= 0) & (q < total[:, None])
    # The last id whose span starts at or before q; zero-size (masked) ids never win a tie.
    token = jax.vmap(lambda s, x: jnp.searchsorted(s, x, side="right"))(start, q) - 1
    token = jnp.clip(token, 0, input_ids.shape[1] - 1)
    take = lambda a: jnp.take_along_axis(a, token, axis=1)  # noqa: E731
    is_image = take(is_img) & valid
    image_row = (first_image[:, None] + take(image_ord)) * tokens_per_image + (q - take(start))
    image_row = jnp.where(is_image, image_row, 0)
    if segment_ids is None:
        return SplicePlan(token, image_row, is_image, valid, jnp.where(valid, q, 0))
    segments = jnp.where(valid, take(segment_ids.astype(jnp.int32)), 0)
    at = jnp.broadcast_to(jnp.arange(length), segments.shape)
    starts = jnp.concatenate([jnp.ones_like(valid[:, :1]), segments[:, 1:] != segments[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, at, 0), axis=1)  # merged index where each position's segment starts
    return SplicePlan(token, image_row, is_image, valid, jnp.where(valid, at - first, 0), segments)


def splice_embeds(plan: SplicePlan, text: jax.Array, images: jax.Array) -> jax.Array:
    """text [B, T, D] and images [num_images, N, D] -> merged [B, L, D], zeros at padding."""
    flat = images.reshape(-1, images.shape[-1]).astype(text.dtype)
    out = jnp.where(plan.is_image[..., None], flat[plan.image_row],
                    jnp.take_along_axis(text, plan.token[..., None], axis=1))
    return jnp.where(plan.valid[..., None], out, 0)


def splice_labels(plan: SplicePlan, labels: jax.Array) -> jax.Array:
    """labels [B, T] -> [B, L]: IGNORE_INDEX at visual tokens and padding."""
    out = jnp.take_along_axis(labels, plan.token, axis=1)
    return jnp.where(plan.valid & ~plan.is_image, out, IGNORE_INDEX)


class MGM(nn.Module):
    """The Mini-Gemini model. Parameter paths mirror the PyTorch names (see `mgjax.convert.names`)."""

    config: MGMConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = CLIPVisionTower(c.vision, c.clip_layers_used, **kw)
        self.vision_tower_aux = ConvNextTrunk(c.vision_aux, **kw)
        self.vlm_uni_query_projector = UniProjector(c.mm_hidden_size, ("vis_embed", "vis_mlp"), **kw)
        # in: the 2880 concatenated ConvNeXt channels (replicated like the tower); out: split by FSDP
        self.vlm_uni_aux_projector = UniProjector(c.mm_hidden_size, ("conv_out", "vis_embed"), **kw)
        self.vlm_uni_val_projector = UniProjector(c.mm_hidden_size, ("conv_out", "vis_embed"), **kw)
        self.mm_projector = MLPProjector(c.lm.hidden_size, **kw)
        self.llm = Decoder(c.lm, **kw)

    def encode_images(self, images: jax.Array, images_aux: jax.Array, deterministic: bool = True) -> jax.Array:
        """images [n, h, w, 3] (HD: [n, V, h, w, 3], global view last), images_aux [n, S, S, 3]
        -> visual tokens in the LLM's width [n, tokens_per_image, H]."""
        c = self.config
        views = images[:, None] if images.ndim == 4 else images
        n, v = views.shape[:2]
        feats = self.vision_tower(views.reshape(n * v, *views.shape[2:])).reshape(n, v, -1, c.mm_hidden_size)
        stages = self.vision_tower_aux(images_aux, deterministic)
        aux_map = multi_stage_map(stages).astype(feats.dtype)
        tokens = visual_tokens(feats, aux_map, c.image_grid, c.image_global, self.vlm_uni_query_projector,
                               self.vlm_uni_aux_projector, self.vlm_uni_val_projector)
        embeds = self.mm_projector(tokens)
        for name, value in (("clip_features", feats), ("aux_stages", tuple(stages)), ("aux_map", aux_map),
                            ("projector_in", tokens), ("image_embeds", embeds)):
            self.sow("intermediates", name, value)
        return embeds

    def __call__(self, input_ids: jax.Array, images: jax.Array, images_aux: jax.Array, attention_mask: jax.Array,
                 length: int, deterministic: bool = True,
                 segment_ids: jax.Array | None = None, hidden_only: bool = False) -> tuple[jax.Array, SplicePlan]:
        """input_ids int [B, T] with -200 placeholders, attention_mask [B, T] (1 = real token)
        -> float32 logits [B, L, V] over the merged sequence of static `length` L, and its plan.
        `hidden_only`: the LLM's final-normed hidden states [B, L, D] instead of logits (see `head`).

        `segment_ids` int [B, T] (packed rows, see `splice_plan`): positions restart at each segment and
        attention stays within it, so each sample's logits are those it has alone; give `plan.segments`
        to `next_token_loss` so that no target crosses a boundary."""
        embeds, plan = self._merged(input_ids, images, images_aux, attention_mask, length, self.config.padding_side,
                                    deterministic, segment_ids)
        return self.llm(embeds, plan.positions, plan.valid, plan.segments, hidden_only=hidden_only), plan

    def head(self, hidden: jax.Array) -> jax.Array:
        """The LM head: hidden states [B, L, D] from `__call__(hidden_only=True)` -> float32 logits [B, L, V]."""
        return self.llm.head(hidden)

    def _merged(self, input_ids, images, images_aux, attention_mask, length, padding_side, deterministic=True,
                segment_ids=None, image_embeds=None) -> tuple[jax.Array, SplicePlan]:
        """The merged input embeddings [B, L, D] (text with the visual tokens spliced in) and their plan;
        `image_embeds`, when given, are the images' `encode_images` output."""
        c = self.config
        if image_embeds is None:
            image_embeds = self.encode_images(images, images_aux, deterministic)
        plan = splice_plan(input_ids, attention_mask, c.tokens_per_image, length, padding_side, segment_ids)
        text = self.llm.embed(jnp.where(input_ids == IMAGE_TOKEN_INDEX, 0, input_ids))
        # Every row may take any image's tokens: gathered whole first (the projector leaves them split along
        # D over fsdp, a layout XLA cannot turn into the merged rows' split without replicating it anyway).
        image_embeds = constrain(image_embeds, (None, None, "act_embed"))
        embeds = splice_embeds(plan, text, image_embeds)
        self.sow("intermediates", "inputs_embeds", embeds)
        return embeds, plan

    def prefill(self, input_ids: jax.Array, images: jax.Array | None, images_aux: jax.Array | None,
                attention_mask: jax.Array, length: int, cache: Any,
                image_embeds: jax.Array | None = None) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
        """Generation's first pass: the prompts (as `__call__` takes them) merged, LEFT-padded to `length` so
        that every row's last token sits at slot length - 1, written into cache slots 0 .. length - 1.
        `image_embeds` [n, tokens_per_image, H]: the images' visual tokens, encoded before (`encode_images`;
        the images are then not needed). Returns (float32 logits [B, V] of each row's last token, the cache,
        valid bool [B, length], the position of each row's next token int [B])."""
        embeds, plan = self._merged(input_ids, images, images_aux, attention_mask, length, "left",
                                    image_embeds=image_embeds)
        slots = jax.tree.leaves(cache)[0].shape[-3]
        valid = jnp.pad(plan.valid, ((0, 0), (0, slots - length)))
        logits, cache = self.llm(embeds, plan.positions, valid, cache=cache, index=0, last_only=True)
        return logits[:, 0], cache, plan.valid, plan.positions[:, -1] + 1

    def decode(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array, cache: Any,
               index: jax.Array) -> tuple[jax.Array, Any]:
        """One generation step: tokens int [B] at cache slot `index` (int, or int [B]: each row's own) with
        rotary positions int [B]; `valid` bool [B, S] over the cache slots -> (float32 logits [B, V] of the
        next token, the cache)."""
        embeds = self.llm.embed(tokens[:, None])
        logits, cache = self.llm(embeds, positions[:, None], valid, cache=cache, index=index, last_only=True)
        return logits[:, 0], cache


def _init_fn(module: MGM):
    """rng -> boxed (logically partitioned) parameters, from dummy inputs of the config's shapes."""
    c = module.config
    s = c.image_size
    images = jnp.zeros((1, s, s, 3) if c.num_views == 1 else (1, c.num_views, s, s, 3), jnp.float32)
    aux = jnp.zeros((1, c.image_size_aux, c.image_size_aux, 3), jnp.float32)
    ids = jnp.zeros((1, 1), jnp.int32)
    return lambda rng: module.init(rng, ids, images, aux, ids, length=1)["params"]


def abstract_params(module: MGM, boxed: bool = False) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating; `boxed` keeps the logical axis
    names (`nn.LogicallyPartitioned` leaves) that sharding rules read."""
    tree = _copy_dicts(_abstract_boxed(module.config, jnp.dtype(module.dtype), jnp.dtype(module.param_dtype)))
    return tree if boxed else nn.unbox(tree)


@functools.lru_cache(maxsize=16)
def _abstract_boxed(config: MGMConfig, dtype, param_dtype) -> dict:
    # Tracing a released model's init takes seconds (MGM-34B-HD: ~4 s), and loaders, the planner and the
    # trainer ask for the same tree several times.
    return jax.eval_shape(_init_fn(MGM(config, dtype=dtype, param_dtype=param_dtype)), jax.random.key(0))


def _copy_dicts(tree):
    """A copy of the nesting (callers may edit the dicts they get); the leaves are immutable."""
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def init_params(module: MGM, rng: jax.Array, mesh=None, rules=None) -> dict:
    """Fresh parameters; with a mesh, created directly in their shards (jit with out_shardings from
    `eval_shape`), so no device ever holds a full copy."""
    init = _init_fn(module)
    if mesh is None:
        return nn.unbox(jax.jit(init)(rng))
    shardings = param_shardings(abstract_params(module, boxed=True), mesh, rules or DEFAULT_RULES)
    # Not under `activate`: flax's DenseGeneral reshapes a multi-axis kernel after its boxed init, and a
    # logical constraint on the flat intermediate would fail; out_shardings alone places the result.
    return nn.unbox(jax.jit(init, out_shardings=shardings)(rng))
