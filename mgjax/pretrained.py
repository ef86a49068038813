"""`load_pretrained` and `Pretrained`: a released MGM checkpoint, ready to run."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mgjax.config import IMAGE_TOKEN_INDEX, MGMConfig
from mgjax.convert import load_params
from mgjax.convert.mgjax_ckpt import is_mgjax_checkpoint, read_meta
from mgjax.convert.source import open_source
from mgjax.data.image import ImageLike, preprocess_image
from mgjax.data.templates import build_prompt, get_template
from mgjax.data.tokenize import checkpoint_template, load_tokenizer, tokenize_with_images
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params, merged_lengths
from mgjax.sharding import DEFAULT_RULES, Rules, activate, batch_sharding, batch_shards, param_shardings
from mgjax.train.checkpoints import is_run_dir, restore_run_params

DTYPES = ("float32", "bfloat16", "float16")
# Preprocessed pixels lie in [-1.8, 2.2] (CLIP normalisation of [0, 1]); far beyond is raw pixels.
PIXEL_LIMIT = 10.0


def length_bucket(n: int, limit: int) -> int:
    """The compiled sequence length serving `n` tokens: the next of 64, 96, 128, 192, 256, ... (two per
    octave, at most a third wasted), capped at `limit`."""
    b = 64
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return min(b, limit)


@dataclass
class Pretrained:
    """A loaded MGM model: `config`, `params`, `module` (the linen module) and `tokenizer`."""

    config: MGMConfig
    params: Any
    module: MGM
    path: Path
    tokenizer_path: Path | None = None  # where the tokenizer files are, when not in `path`
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES
    template_evidence: str = ""  # why config.template was chosen (families.TEMPLATE_ORDER)
    _tokenizer: Any = field(default=None, repr=False)
    _jitted: dict = field(default_factory=dict, repr=False)

    @property
    def tokenizer(self):
        """From the checkpoint's own files (or the base LLM's, for a stage-1 release); never the network."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path or self.path)
        return self._tokenizer

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """One image (PIL, uint8 NumPy H x W x 3, or a path) -> (images, images_aux) NHWC without batch
        axis, exactly as the original builds them."""
        return preprocess_image(image, self.config)

    def build_prompt(self, question: str, template: str | None = None) -> str:
        """A one-turn prompt for one image in the checkpoint's template (or `template`)."""
        return build_prompt(question, template or self.config.template)

    def tokenize(self, prompt: str) -> np.ndarray:
        """Prompt text with `<image>` markers -> int ids with -200 placeholders."""
        return np.asarray(tokenize_with_images(self.tokenizer, prompt), np.int32)

    def logits(self, input_ids, images, images_aux, attention_mask=None, *, truncate: bool = False) -> jax.Array:
        """float32 logits [B, L, V] over the merged (text + visual) sequence, padded on the config's side
        like the original; L = the longest merged row.

        input_ids int [B, T] with -200 at image positions; images [n, h, w, 3] (HD: [n, V, h, w, 3],
        global view last) as `preprocess` makes them; images_aux [n, S, S, 3]; attention_mask [B, T],
        1 = real token. A merged row longer than `config.max_length` is an error, or with
        `truncate=True` cut to it (as the original does) with a warning.
        """
        ids, mask, images, images_aux, length = self._check_inputs(input_ids, images, images_aux, attention_mask,
                                                                   truncate)
        # Prompts of any length run through a few compiled programs: the merged length is bucketed and
        # the padding (masked, after every real token) sliced off again.
        bucket = length_bucket(length, self.config.max_length)
        if bucket not in self._jitted:
            self._jitted[bucket] = jax.jit(
                lambda p, i, im, aux, m: self.module.apply({"params": p}, i, im, aux, m, length=bucket)[0])
        inputs = (ids, images, images_aux, mask)
        if self.mesh is None:
            out = self._jitted[bucket](self.params, *inputs)
        else:
            with activate(self.mesh, self.rules):
                out = self._jitted[bucket](self.params, *(self._place(x) for x in inputs))
        return out[:, :length] if self.config.padding_side == "right" else out[:, bucket - length:]

    def _place(self, x):
        """A batch array onto the mesh: split like `act_batch` when the batch divides, else replicated."""
        s = batch_sharding(self.mesh, x.ndim, self.rules)
        if x.shape[0] % batch_shards(self.mesh):
            s = NamedSharding(self.mesh, PartitionSpec())
        return jax.device_put(x, s)

    def _check_inputs(self, input_ids, images, images_aux, attention_mask, truncate: bool):
        """The inputs as int32 / float32 arrays and the merged length, after checking everything that
        would otherwise fail inside the program or silently give garbage (out-of-vocabulary ids give NaN)."""
        c = self.config
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise MGJaxError(f"input_ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise MGJaxError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        bad = np.argwhere((mask != 0) & (mask != 1))
        if len(bad):
            r, t = bad[0]
            raise MGJaxError(f"attention_mask[{r}, {t}] = {mask[r, t]}: the mask holds 1 (token) or 0 (padding)")
        bad = np.argwhere((mask == 1) & (ids != IMAGE_TOKEN_INDEX) & ((ids < 0) | (ids >= c.lm.vocab_size)))
        if len(bad):
            r, t = bad[0]
            raise MGJaxError(f"input_ids[{r}, {t}] = {ids[r, t]} is not a token id of this model "
                             f"(0..{c.lm.vocab_size - 1}; {IMAGE_TOKEN_INDEX} marks an image)")
        images, images_aux = self._check_images(ids, mask, images, images_aux)
        merged = merged_lengths(ids, mask, c.tokens_per_image)
        row = int(np.argmax(merged))
        if merged[row] > c.max_length:
            what = (f"prompt row {row} is {merged[row]} tokens long with its images expanded, more than the model's "
                    f"maximum length {c.max_length}")
            if not truncate:
                raise MGJaxError(f"{what}; shorten it, or pass truncate=True to cut it like the original does")
            warnings.warn(f"{what}: truncated to {c.max_length}", stacklevel=3)
        length = int(min(merged[row], c.max_length))
        return ids.astype(np.int32), mask.astype(np.int32), images, images_aux, length

    def _check_images(self, ids, mask, images, images_aux):
        c = self.config
        images, images_aux = np.asarray(images), np.asarray(images_aux)
        for name, x in (("images", images), ("images_aux", images_aux)):
            if not np.issubdtype(x.dtype, np.floating):
                raise MGJaxError(f"{name} are {x.dtype}: pass the preprocessed float pixels that "
                                 "Pretrained.preprocess() (use preprocess()) makes from an image")
            if not np.isfinite(x).all() or np.abs(x).max(initial=0) > PIXEL_LIMIT:
                raise MGJaxError(f"{name} hold values in [{x.min():.3g}, {x.max():.3g}], far outside the "
                                 "preprocessed range (about -1.8 .. 2.2): raw pixels? use preprocess()")
        s, sa = c.image_size, c.image_size_aux
        want = (s, s, 3) if c.num_views == 1 else (c.num_views, s, s, 3)
        if images.shape[1:] != want:
            raise MGJaxError(f"images must be [n, {', '.join(map(str, want))}] (NHWC) for this model, "
                             f"got {images.shape}")
        if images_aux.shape[1:] != (sa, sa, 3) or images_aux.shape[0] != images.shape[0]:
            raise MGJaxError(f"images_aux must be [{images.shape[0]}, {sa}, {sa}, 3], got {images_aux.shape}")
        per_row = ((ids == IMAGE_TOKEN_INDEX) & (mask != 0)).sum(1)
        needed = int(np.maximum(per_row, 1).sum())
        if needed != images.shape[0]:
            raise MGJaxError(f"the prompts need {needed} images (one per <image> marker, and one for each row "
                             f"without a marker, as in the original) but {images.shape[0]} were given")
        return images.astype(np.float32), images_aux.astype(np.float32)


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32", vision_tower: str | os.PathLike | None = None,
                    vision_tower_aux: str | os.PathLike | None = None, base_llm: str | os.PathLike | None = None,
                    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, template: str | None = None) -> Pretrained:
    """Loads an MGM checkpoint folder: the released layout (config.json plus safetensors or .bin
    shards), a stage-1 release (`mm_projector.bin`, with `base_llm` = the base LLM checkpoint folder),
    or a folder written by `mgjax convert`, or a `run_dir` of `mgjax train` (its newest readable checkpoint).

    Released layout: tower weights come from the checkpoint when present, else from the tower
    folders named in config.json (tried relative to the working directory and to the checkpoint's
    parent folder) or given by `vision_tower` / `vision_tower_aux`. Every parameter is filled; any
    checkpoint tensor that maps nowhere (beyond the documented ignore list) is an error.

    `template` names the conversation template; None reads it from the checkpoint (see
    `families.detect_template`; an mgjax checkpoint records the one chosen when it was converted).
    With a `mesh`, every parameter goes straight into its shards (laid out by `rules`), and
    `logits` runs sharded over that mesh.
    """
    path = Path(path).expanduser().resolve()  # a later chdir must not change what the model reads
    if not path.is_dir():
        raise MGJaxError(f"{path}: checkpoint folder not found")
    if dtype not in DTYPES:
        raise MGJaxError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if template is not None:
        get_template(template)
    dt = jnp.dtype(dtype)
    tokenizer = None
    if is_run_dir(path):
        config, meta = read_meta(path)
        source, tokenizer_path, evidence = None, Path(meta["tokenizer"]), "recorded by mgjax train"
    elif is_mgjax_checkpoint(path):
        config, _ = read_meta(path)
        source, tokenizer_path, evidence = path, path, "recorded by mgjax convert"
    else:
        source = open_source(path, vision_tower, vision_tower_aux, base_llm)
        config, tokenizer_path = source.config, source.tokenizer_dir.resolve()
        if template is None:
            detected, evidence, tokenizer = checkpoint_template(config.lm.family, tokenizer_path,
                                                                (path, base_llm, path.parent))
            config = dataclasses.replace(config, template=detected)
    if template is not None:
        config, evidence = dataclasses.replace(config, template=template), "template= argument"
    module = MGM(config, dtype=dt, param_dtype=dt)
    shardings = None if mesh is None else param_shardings(abstract_params(module, boxed=True), mesh, rules)
    if source is None:
        abstract = abstract_params(module) if shardings is None else jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(module), shardings)
        params = restore_run_params(path, abstract)[1]
    else:
        params = load_params(source, abstract_params(module), dt, shardings)
    return Pretrained(config, params, module, path, tokenizer_path=tokenizer_path, mesh=mesh, rules=rules,
                      template_evidence=evidence, _tokenizer=tokenizer)
