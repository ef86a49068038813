"""`preprocess_image` against an independent reference of the original's image pipeline (docs/mgm_spec.md section 2).

The reference: PIL `convert("RGB")` (as the original's `Image.open(...).convert('RGB')`), an expand2square
written here in PIL, transformers' PIL/NumPy `CLIPImageProcessorPil` at S = image_size_aux, then
`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` for the low-res view and, in HD,
the original's reshape/permute into 2x2 tiles plus a second interpolate for the global view.

transformers 5's `CLIPImageProcessor` is the torchvision backend; without torchvision it falls back to
`CLIPImageProcessorPil` with a warning. The PIL class is named explicitly here so the reference is always
the PIL/NumPy path (the one the original, transformers 4.x slow processor, ran).

Tolerance: 1e-5 x max|expected| on every array. Measured: images_aux <= 4.8e-7 abs (2.5e-7 of the scale),
images <= 1.5e-6 abs (7.2e-7 of the scale, RGBA padded), i.e. float32 rounding of rescale/normalise
(mgjax multiplies by float32 1/255, transformers rescales in float64) and of the bilinear weights.
The reference reproduces the original's golden arrays bit for bit (first test).
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessorPil

from mgjax.presets import preset
from mgjax.data.image import PAD_COLOR, bilinear, expand_to_square, padded_square, preprocess_image
import tiny
from helpers import GOLDEN, assert_close, nhwc

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TINY = tiny.mgm(image_size_aux=128)
TINY_HD = tiny.mgm(hd=True, image_size_aux=256)
CASE_A = GOLDEN / "llama_vicuna"


def expand2square(img, color):
    """The original's expand2square: paste centred on a max(w, h) square of `color`."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h), max(w, h)), color)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def reference(img, config, pad):
    """(images, images_aux) as the original builds them, NCHW torch -> NHWC numpy."""
    img = img.convert("RGB")
    if pad:
        img = expand2square(img, tuple(int(m * 255) for m in MEAN))
    S = config.image_size_aux
    proc = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, do_resize=True,
                                 do_center_crop=True, do_rescale=True, do_normalize=True, resample=3,
                                 image_mean=list(MEAN), image_std=list(STD))
    aux = proc.preprocess(img, return_tensors="pt")["pixel_values"][0]  # [3, S, S]
    s, g = config.image_size, config.image_grid
    image = F.interpolate(aux[None], size=[s * g, s * g], mode="bilinear", align_corners=False)[0]
    if g >= 2:
        tiles = image.reshape(3, g, s, g, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
        if config.image_global:
            glob = F.interpolate(image[None], size=[s, s], mode="bilinear", align_corners=False)
            tiles = torch.cat([tiles, glob], dim=0)
        image = tiles.contiguous()
    return nhwc(image.numpy()), nhwc(aux.numpy())


def check(img, config, pad, what):
    images, images_aux = preprocess_image(img, config, pad=pad)
    ref_images, ref_aux = reference(img, config, config.image_aspect_ratio == "pad" if pad is None else pad)
    assert_close(images_aux, ref_aux, 1e-5, f"{what} images_aux")
    assert_close(images, ref_images, 1e-5, f"{what} images")
    return images, images_aux


def gradient(w, h, mode):
    """A small synthetic image with structure in every channel, so crops and pads are visible."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 7 + y * 13) % 256], -1).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(rgb[..., 0] // 2 + rgb[..., 2] // 2, "L")
    if mode == "RGBA":
        alpha = ((x + y) * 255 // (w + h - 2)).astype(np.uint8)  # transparent corner to opaque corner
        return Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
    return Image.fromarray(rgb, mode)


def test_reference_reproduces_the_golden_arrays():
    """The reference itself matches the original's recorded arrays (case A: input.jpg, and input2.png as the
    second image of the batch test), so the comparisons below are against the original's pipeline."""
    ref = np.load(CASE_A / "expected.npz")
    for i, name in enumerate(["input.jpg", "input2.png"]):
        images, aux = reference(Image.open(CASE_A / name), TINY, pad=True)
        assert_close(images, nhwc(ref["batch_images"][i]), 1e-5, f"reference {name} images")
        assert_close(aux, nhwc(ref["batch_images_aux"][i]), 1e-5, f"reference {name} images_aux")


@pytest.mark.parametrize("name,size", [("input.jpg", (570, 380)), ("input2.png", (130, 190))])
def test_golden_inputs_padded(name, size):
    img = Image.open(CASE_A / name)
    assert img.size == size
    images, images_aux = check(img, TINY, None, name)  # TINY.image_aspect_ratio == "pad"
    assert images.shape == (56, 56, 3) and images_aux.shape == (128, 128, 3)


@pytest.mark.parametrize("name", ["input.jpg", "input2.png"])
def test_hd_tiles_and_global_view(name):
    images, images_aux = check(Image.open(CASE_A / name), TINY_HD, None, f"HD {name}")
    assert images.shape == (5, 56, 56, 3) and images_aux.shape == (256, 256, 3)
    # order TL, TR, BL, BR, global: the tiles put back together are the 112x112 view, and the global view is
    # that view downsampled 2x (bilinear, no antialias, at exactly 2x = the mean of each 2x2 block)
    big = np.concatenate([np.concatenate(images[0:2], 1), np.concatenate(images[2:4], 1)], 0)
    assert_close(images[4], big.reshape(56, 2, 56, 2, 3).mean((1, 3)), 1e-5, "global view = 2x2 mean of the tiles")


@pytest.mark.parametrize("size", [(300, 170), (150, 260)], ids=["landscape", "portrait"])
def test_stage1_no_padding(size):
    """Stage-1 data: no expand2square, so the shortest-edge resize and the centre crop both act."""
    img = gradient(*size, "RGB")
    check(img, TINY, False, f"pad=False {size}")
    check(img, TINY_HD, False, f"HD pad=False {size}")
    # and the pad flag matters for a non-square input
    assert not np.allclose(preprocess_image(img, TINY, pad=False)[1], preprocess_image(img, TINY, pad=True)[1])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
@pytest.mark.parametrize("pad", [True, False])
def test_non_rgb_modes(mode, pad):
    img = gradient(90, 140, mode) if mode != "P" else gradient(90, 140, "RGB").quantize(16)
    assert img.mode == mode
    check(img, TINY, pad, f"{mode} pad={pad}")


def test_rgba_drops_alpha_like_the_original():
    """The original converts with PIL `convert('RGB')` (alpha dropped) before the processor; transformers'
    own `convert_to_rgb` would composite onto white instead. mgjax must follow the original."""
    img = gradient(90, 140, "RGBA")
    aux = preprocess_image(img, TINY, pad=False)[1]
    proc = CLIPImageProcessorPil(size={"shortest_edge": 128}, crop_size={"height": 128, "width": 128},
                                 image_mean=list(MEAN), image_std=list(STD), resample=3)
    white = nhwc(proc.preprocess(img, return_tensors="np")["pixel_values"][0])  # composited onto white
    assert np.abs(aux - white).max() > 0.5


def test_released_hd_shapes():
    """MGM-7B-HD: four 336 tiles + the global view from a 672 view of the 1536 aux image (shapes only)."""
    images, images_aux = preprocess_image(gradient(64, 48, "RGB"), preset("MGM-7B-HD"))
    assert images.shape == (5, 336, 336, 3) and images_aux.shape == (1536, 1536, 3)
    assert images.dtype == images_aux.dtype == np.float32


@pytest.mark.parametrize("n,size", [(768, 336), (1536, 672), (672, 336), (56, 128)])
def test_bilinear_equals_torch_at_the_released_sizes(n, size):
    """The two-tap resize against F.interpolate at MGM's sizes (768 -> 336; HD 1536 -> 672 -> 336) and an
    upscale: with its sample positions in float64 instead of torch's float32 it would be off by up to 8e-4."""
    x = np.random.RandomState(0).randn(n, n, 3).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=[size, size], mode="bilinear",
                             align_corners=False)[0].permute(1, 2, 0).numpy()
    assert_close(bilinear(x, size), expected, 1e-5, f"bilinear {n} -> {size}")


@pytest.mark.parametrize("w,h,size", [(570, 380, 128), (2048, 1152, 768), (381, 380, 336), (380, 381, 336),
                                      (380, 570, 128), (64, 64, 96), (7, 2, 5), (1000, 3, 40)])
def test_padded_square_equals_resizing_the_whole_canvas(w, h, size):
    """Bit for bit what PIL gives for the padded canvas, wide (padding rows resized once), tall, square,
    upscaled and extreme."""
    img = Image.fromarray(np.random.RandomState(w * h).randint(0, 256, (h, w, 3), np.uint8))
    whole = expand_to_square(img, PAD_COLOR).resize((size, size), Image.BICUBIC)
    assert np.array_equal(np.asarray(padded_square(img, size)), np.asarray(whole))
