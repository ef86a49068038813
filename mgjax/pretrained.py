"""`load_pretrained` and `Pretrained`: a released MGM checkpoint, ready to run (DESIGN section 2)."""

from __future__ import annotations

import functools
import math
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
from mgjax.convert import orbax as mgjax_ckpt
from mgjax.convert.load import load_params, open_source
from mgjax.data.image import preprocess_image
from mgjax.data.templates import build_prompt
from mgjax.data.tokenize import tokenize_with_images
from mgjax.errors import MGJaxError
from mgjax.model import MGM, abstract_params, merged_lengths
from mgjax.sharding import BATCH_AXES, DEFAULT_RULES, Rules, activate, batch_sharding, param_shardings


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
    _jitted: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def tokenizer(self):
        import transformers

        try:
            # transformers warns that model_type "mgm" is unknown to it: harmless for tokenizers.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verbosity = transformers.logging.get_verbosity()
                transformers.logging.set_verbosity_error()
                try:
                    return transformers.AutoTokenizer.from_pretrained(str(self.tokenizer_path or self.path))
                finally:
                    transformers.logging.set_verbosity(verbosity)
        except (OSError, ValueError) as e:
            raise MGJaxError(f"{self.tokenizer_path or self.path}: no usable tokenizer files ({e})") from None

    def preprocess(self, image) -> tuple[np.ndarray, np.ndarray]:
        """One PIL image -> (images, images_aux) NHWC without batch axis, as the original builds them."""
        return preprocess_image(image, self.config)

    def build_prompt(self, question: str, template: str | None = None) -> str:
        """A one-turn prompt for one image in the checkpoint's template (or `template`)."""
        return build_prompt(question, template or self.config.template)

    def tokenize(self, prompt: str) -> np.ndarray:
        """Prompt text with `<image>` markers -> int ids with -200 placeholders."""
        return np.asarray(tokenize_with_images(self.tokenizer, prompt), np.int32)

    def logits(self, input_ids, images, images_aux, attention_mask=None) -> jax.Array:
        """float32 logits [B, L, V] over the merged (text + visual) sequence, padded on the
        config's side like the original; L = the longest merged row, capped at `config.max_length`.

        input_ids int [B, T] with -200 at image positions; images [n, h, w, 3] (HD: [n, V, h, w, 3],
        global view last); images_aux [n, S, S, 3]; attention_mask [B, T], 1 = real token.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise MGJaxError(f"input_ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise MGJaxError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        images, images_aux = self._check_images(ids, mask, images, images_aux)
        c = self.config
        length = int(min(merged_lengths(ids, mask, c.tokens_per_image).max(), c.max_length))
        if length not in self._jitted:
            self._jitted[length] = jax.jit(
                lambda p, i, im, aux, m: self.module.apply({"params": p}, i, im, aux, m, length=length)[0])
        inputs = (np.asarray(ids, np.int32), images, images_aux, np.asarray(mask, np.int32))
        if self.mesh is None:
            return self._jitted[length](self.params, *inputs)
        with activate(self.mesh, self.rules):
            return self._jitted[length](self.params, *(self._place(x) for x in inputs))

    def _place(self, x):
        """A batch array onto the mesh: split like `act_batch` when the batch divides, else replicated."""
        s = batch_sharding(self.mesh, x.ndim, self.rules)
        if x.shape[0] % math.prod(self.mesh.shape[a] for a in BATCH_AXES):
            s = NamedSharding(self.mesh, PartitionSpec())
        return jax.device_put(x, s)

    def _check_images(self, ids, mask, images, images_aux):
        c = self.config
        images, images_aux = np.asarray(images, np.float32), np.asarray(images_aux, np.float32)
        s, sa = c.image_size, c.image_size_aux
        want = (s, s, 3) if c.num_views == 1 else (c.num_views, s, s, 3)
        if images.shape[1:] != want:
            raise MGJaxError(f"images must be [n, {', '.join(map(str, want))}] (NHWC) for this model, "
                             f"got {images.shape}")
        if images_aux.shape[1:] != (sa, sa, 3) or images_aux.shape[0] != images.shape[0]:
            raise MGJaxError(f"images_aux must be [{images.shape[0]}, {sa}, {sa}, 3], got {images_aux.shape}")
        per_row = ((ids == IMAGE_TOKEN_INDEX) & (mask != 0)).sum(1)
        needed = int(np.maximum(per_row, 1).sum())
        if needed > images.shape[0]:
            raise MGJaxError(f"the prompts need {needed} images (one per <image> marker, one per row without "
                             f"a marker) but {images.shape[0]} were given")
        return images, images_aux


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32", vision_tower: str | os.PathLike | None = None,
                    vision_tower_aux: str | os.PathLike | None = None, base_llm: str | os.PathLike | None = None,
                    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Pretrained:
    """Loads an MGM checkpoint folder: the released layout (config.json plus safetensors or .bin
    shards), a stage-1 release (`mm_projector.bin`, with `base_llm` = the base LLM checkpoint folder),
    or a folder written by `mgjax convert`.

    Released layout: tower weights come from the checkpoint when present, else from the tower
    folders named in config.json (tried relative to the working directory and to the checkpoint's
    parent folder) or given by `vision_tower` / `vision_tower_aux`. Every parameter is filled; any
    checkpoint tensor that maps nowhere (beyond the documented ignore list) is an error.

    With a `mesh`, every parameter goes straight into its shards (laid out by `rules`), and
    `logits` runs sharded over that mesh.
    """
    path = Path(path)
    if not path.is_dir():
        raise MGJaxError(f"{path}: checkpoint folder not found")
    dt = jnp.dtype(dtype)
    if mgjax_ckpt.is_mgjax_checkpoint(path):
        config, _ = mgjax_ckpt.read_meta(path)
        source, tokenizer_path = None, None
    else:
        source = open_source(path, vision_tower, vision_tower_aux, base_llm)
        config, tokenizer_path = source.config, source.tokenizer_dir
    module = MGM(config, dtype=dt, param_dtype=dt)
    shardings = None if mesh is None else param_shardings(abstract_params(module, boxed=True), mesh, rules)
    if source is None:
        params = mgjax_ckpt.load_params(path, config, dt, shardings)
    else:
        params = load_params(config, abstract_params(module), source.ckpt, source.towers, dt, shardings)
    return Pretrained(config, params, module, path, tokenizer_path=tokenizer_path, mesh=mesh, rules=rules)
