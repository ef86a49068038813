"""Image preprocessing exactly as the original builds `images` / `images_aux` (docs/mgm_spec.md section 2).

PIL and NumPy do the PIL steps (pad, bicubic resize, crop, normalise); the low-res views are a
bilinear, non-antialiased downsample of the normalised high-res tensor.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from mgjax.config import MGMConfig
from mgjax.errors import MGJaxError

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, bytes]

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


def padded_square(img: Image.Image, size: int, color=PAD_COLOR) -> Image.Image:
    """`expand_to_square(img, color)` resized to size x size (PIL bicubic), bit for bit, without resizing the
    padding of a wide RGB image: PIL resizes along the rows first, each row on its own, so the image's rows are
    resized as they are and the padding's, all one colour, once (a 3:2 image 23% faster, 16:9 30%). A tall
    image's every row holds padding and pixels: resized whole."""
    w, h = img.size
    if w <= h:
        return expand_to_square(img, color).resize((size, size), Image.BICUBIC)
    top = (w - h) // 2
    rows = np.asarray(img.resize((size, h), Image.BICUBIC))  # the rows pass only: the height stays
    pad = np.asarray(Image.new(img.mode, (w, 1), color).resize((size, 1), Image.BICUBIC))
    tall = np.concatenate([np.broadcast_to(pad, (top, size, 3)), rows, np.broadcast_to(pad, (w - h - top, size, 3))])
    return Image.fromarray(tall).resize((size, size), Image.BICUBIC)  # the columns pass only


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


def bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C] as the original's `F.interpolate(mode="bilinear", align_corners=False)`:
    each output pixel blends the 2 x 2 input pixels around its centre (no antialiasing), one axis at a time.
    Two taps, not `jax.image.resize`'s dense weight matrices: HD's 1536 -> 672 takes 16 ms of one core on a
    2-core CPU instead of 80-90 ms of both (in a server's request, a data loader's every sample)."""
    half = np.float32(0.5)
    for axis in (0, 1):  # rows first: whole rows are gathered, and the second pass has fewer of them
        n = x.shape[axis]
        # in float32 as torch computes it: float64 positions move a 1536 -> 672 resize by up to 8e-4
        centre = np.maximum((np.arange(size, dtype=np.float32) + half) * (np.float32(n) / np.float32(size)) - half,
                            np.float32(0))  # torch clamps the source at 0
        first = np.minimum(centre.astype(np.int64), n - 1)
        frac = (centre - first.astype(np.float32)).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        x = np.take(x, first, axis) * (1 - frac) + np.take(x, np.minimum(first + 1, n - 1), axis) * frac
    return x


def _check_size(w: int, h: int, what: str) -> None:
    """An empty image, or PIL's decompression-bomb limit, as an error for every kind of input (PIL itself
    only warns below twice the limit, and never checks images built in memory)."""
    if w < 1 or h < 1:  # PIL opens and resizes these without a word; the pixels would be garbage
        raise MGJaxError(f"{what}: {w} x {h} pixels, an empty image; pass an image with pixels")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise MGJaxError(f"{what}: {w} x {h} = {w * h} pixels exceeds the limit of {limit} (a decompression bomb, "
                         "or an image far larger than the model's input); downscale it first, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust it")


def load_image(image: ImageLike) -> Image.Image:
    """A PIL image, a NumPy uint8 array (H x W, H x W x 3 or H x W x 4), a path or the bytes of an image
    file (as packed training data holds them) -> an RGB PIL image.

    Every mode is converted with PIL's `convert("RGB")` as the original does after `Image.open`
    (16-bit grey is clipped to 255, palette and CMYK mapped, alpha dropped)."""
    if isinstance(image, (str, os.PathLike, bytes)):
        what = f"image bytes ({len(image)} B)" if isinstance(image, bytes) else os.fspath(image)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(image) if isinstance(image, bytes) else what)
                _check_size(*img.size, what)
                img.load()
        except MGJaxError:  # _check_size's, which names the problem (an MGJaxError is a ValueError, caught below)
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise MGJaxError(f"{what}: {e} Downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you "
                             "trust it") from None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise MGJaxError(f"{what}: cannot read the image ({type(e).__name__}: {e})") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
            raise MGJaxError(f"image array of {image.dtype} {image.shape}: pass uint8 pixels, H x W x 3 (RGB), "
                             "H x W x 4 (RGBA) or H x W (grey), or a PIL image or a path")
        _check_size(image.shape[1], image.shape[0], "image array")
        img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    elif isinstance(image, Image.Image):
        _check_size(*image.size, "image")
        img = image
    else:
        raise MGJaxError(f"cannot use a {type(image).__name__} as an image: pass a PIL image, a uint8 NumPy array, "
                         "a path or the file's bytes")
    with warnings.catch_warnings():  # palette images with transparency: PIL asks for RGBA first; RGB drops it
        warnings.simplefilter("ignore", UserWarning)
        return img.convert("RGB")


def preprocess_image(img: ImageLike, config: MGMConfig, pad: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image (see `load_image`) -> (images, images_aux) NHWC without the batch axis.

    images: [h, w, 3] for grid 1, else [V, h, w, 3] (tiles TL, TR, BL, BR, then the global view);
    images_aux: [S, S, 3]. `pad` defaults to `config.image_aspect_ratio == "pad"`; stage-1 data used
    plain resize + centre crop (pad=False).
    """
    img = load_image(img)
    if pad if pad is not None else config.image_aspect_ratio == "pad":
        img = padded_square(img, config.image_size_aux)  # then clip_process's resize and crop keep it as it is
    aux = clip_process(img, config.image_size_aux)
    low = config.image_size * config.image_grid
    big = bilinear(aux, low)
    if config.image_grid == 1:
        return big, aux
    s = config.image_size
    views = [big[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(config.image_grid)
             for c in range(config.image_grid)]
    if config.image_global:
        views.append(bilinear(big, s))
    return np.stack(views), aux
