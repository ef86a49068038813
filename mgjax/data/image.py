"""Image preprocessing exactly as the original builds `images` / `images_aux` (MGM_SPEC section 2).

PIL and NumPy do the PIL steps (pad, bicubic resize, crop, normalise); the low-res views are a
bilinear, non-antialiased downsample of the normalised high-res tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mgjax.config import MGMConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)


def expand_to_square(img: Image.Image, color=PAD_COLOR) -> Image.Image:
    """Paste centred on a square canvas of side max(w, h) filled with `color`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_process(img: Image.Image, size: int) -> np.ndarray:
    """HF CLIPImageProcessor at `size`: bicubic shortest-edge resize, centre crop, /255, normalise.
    Returns float32 [size, size, 3]."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    arr = np.asarray(img.resize((new_w, new_h), Image.BICUBIC), dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = arr[top:top + size, left:left + size]
    return ((arr * np.float32(1 / 255) - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32))


def preprocess_image(img: Image.Image, config: MGMConfig, pad: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One PIL image -> (images, images_aux) NHWC without the batch axis.

    images: [h, w, 3] for grid 1, else [V, h, w, 3] (tiles TL, TR, BL, BR, then the global view);
    images_aux: [S, S, 3]. `pad` defaults to `config.image_aspect_ratio == "pad"`; stage-1 data used
    plain resize + centre crop (pad=False).
    """
    img = img.convert("RGB")
    if pad if pad is not None else config.image_aspect_ratio == "pad":
        img = expand_to_square(img)
    aux = clip_process(img, config.image_size_aux)
    low = config.image_size * config.image_grid
    big = jax.image.resize(jnp.asarray(aux), (low, low, 3), "bilinear", antialias=False)
    if config.image_grid == 1:
        return np.asarray(big), aux
    s = config.image_size
    views = [big[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(config.image_grid)
             for c in range(config.image_grid)]
    if config.image_global:
        views.append(jax.image.resize(big, (s, s, 3), "bilinear", antialias=False))
    return np.asarray(jnp.stack(views)), aux
