"""Bad input to the Python API gets an MGJaxError naming what is wrong (never NaN or a raw crash), images
of every kind are accepted like the original accepts them, and prompts of any length share a few
compiled programs."""

import shutil
import time

import numpy as np
import pytest
from PIL import Image

import mgjax
from mgjax.data.image import load_image
from mgjax.errors import MGJaxError
from helpers import GOLDEN, assert_close, golden_model, nhwc

CASE = GOLDEN / "llama_vicuna"


@pytest.fixture(scope="module")
def model():
    return golden_model()


@pytest.fixture(scope="module")
def golden():
    ref = np.load(CASE / "expected.npz")
    return ref["input_ids"], nhwc(ref["images"]), nhwc(ref["images_aux"])


def test_golden_inputs_pass(model, golden):
    ids, images, aux = golden
    assert_close(model.logits(ids, images, aux), np.load(CASE / "expected.npz")["logits"], 1e-5, "logits")


@pytest.mark.parametrize("change,match", [
    (lambda ids, im, aux: (ids, (im * 60 + 120).astype(np.uint8), aux), r"images are uint8.*use preprocess\(\)"),
    (lambda ids, im, aux: (ids, im * 100, aux), r"images hold values .* far outside .*use preprocess\(\)"),
    (lambda ids, im, aux: (ids, im, np.full_like(aux, np.nan)), r"images_aux hold values"),
    (lambda ids, im, aux: (np.where(np.arange(ids.shape[1]) == 5, 640, ids), im, aux),
     r"input_ids\[0, 5\] = 640 is not a token id of this model \(0..639"),
    (lambda ids, im, aux: (np.where(np.arange(ids.shape[1]) == 7, -1, ids), im, aux), r"input_ids\[0, 7\] = -1"),
    (lambda ids, im, aux: (ids, np.concatenate([im, im]), np.concatenate([aux, aux])),
     r"the prompts need 1 images .* but 2 were given"),
    (lambda ids, im, aux: (np.concatenate([ids, ids]), im, aux), r"need 2 images .* but 1 were given"),
])
def test_bad_inputs_name_the_problem(model, golden, change, match):
    with pytest.raises(MGJaxError, match=match):
        model.logits(*change(*golden))


def test_attention_mask_must_be_zero_or_one(model, golden):
    ids, images, aux = golden
    mask = np.ones_like(ids)
    mask[0, 3] = 2
    with pytest.raises(MGJaxError, match=r"attention_mask\[0, 3\] = 2"):
        model.logits(ids, images, aux, mask)


def test_too_long_prompt_is_an_error_or_truncated_when_asked(model, golden):
    ids, images, aux = golden
    limit = model.config.max_length
    long_ids = np.concatenate([ids, np.full((1, limit), 5, ids.dtype)], axis=1)
    with pytest.raises(MGJaxError, match=rf"more than the model's maximum length {limit}.*truncate=True"):
        model.logits(long_ids, images, aux)
    with pytest.warns(UserWarning, match=f"truncated to {limit}"):
        cut = model.logits(long_ids, images, aux, truncate=True)
    assert cut.shape[1] == limit
    # truncation happens after expansion: the first positions are the untruncated prompt's
    assert_close(cut[:, :ids.shape[1]], model.logits(ids, images, aux)[:, :ids.shape[1]], 1e-5, "truncated prefix")


def test_unknown_dtype():
    with pytest.raises(MGJaxError, match="dtype 'float8' is not one of float32, bfloat16, float16"):
        mgjax.load_pretrained(CASE / "MGM-7B-tiny", dtype="float8")


def test_length_buckets_waste_little_and_stay_few():
    """Inference buckets: at least the length; 64, 96, 128, 192, 256 up to 256 tokens, then padding
    < max(16, n / 32) tokens (<= 5% from 320 tokens), 32 per doubling of length (multiples of 16 up to 1024);
    training's: 64, 96, 128, 192, ... (two per doubling)."""
    from mgjax.pretrained import TRAIN_PER_OCTAVE, length_bucket

    limit = 1 << 14
    got = [length_bucket(n, limit) for n in range(1, limit + 1)]
    assert all(b >= n and b % 16 == 0 and (n <= 256 or b - n < max(16, n / 32)) for n, b in enumerate(got, 1))
    assert max((b - n) / n for n, b in enumerate(got, 1) if n >= 320) <= 0.05
    assert sorted(set(got))[:6] == [64, 96, 128, 192, 256, 272]
    assert len(set(got)) == 5 + 16 + 32 * 5  # 64 .. 256, 272 .. 512 by 16, then 32 per doubling up to 16384
    assert (length_bucket(343, limit), length_bucket(615, limit), length_bucket(3000, 2048)) == (352, 624, 2048)
    train = sorted({length_bucket(n, 2048, TRAIN_PER_OCTAVE) for n in range(1, 2049)})
    assert train == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]


def test_lengths_share_bucketed_programs(model, golden):
    """Prompts of 3 lengths in one length bucket compile one program, and each gives the golden logits
    of the original on the prompt it extends (causal: later tokens change nothing before them)."""
    ids, images, aux = golden
    want = np.load(CASE / "expected.npz")["logits"]
    model._jitted.clear()
    for extra in (1, 3, 6):
        longer = np.concatenate([ids, np.full((1, extra), 7, ids.dtype)], axis=1)
        got = model.logits(longer, images, aux)
        assert got.shape[1] == want.shape[1] + extra
        assert_close(got[:, :want.shape[1]], want, 1e-5, f"+{extra} tokens")
    assert len(model._jitted) == 1


# --- images --------------------------------------------------------------------------------------

def _rgb(img):
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_every_image_mode_converts_like_the_original(tmp_path, mode):
    """A file of each mode gives what the original's Image.open(path).convert('RGB') gives."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 60000, (24, 40), np.uint16))
    if mode == "P":
        img.info["transparency"] = 0
    ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"x.{ext}"
    img.save(path)
    want = _rgb(Image.open(path))
    assert np.array_equal(np.asarray(load_image(path)), want)
    assert np.array_equal(np.asarray(load_image(str(path))), want)
    assert np.array_equal(np.asarray(load_image(Image.open(path))), want)


def test_preprocess_accepts_pil_array_and_path(model):
    path = CASE / "input.jpg"
    by_path = model.preprocess(path)
    for other in (Image.open(path), np.asarray(Image.open(path).convert("RGB"))):
        got = model.preprocess(other)
        assert all(np.array_equal(a, b) for a, b in zip(got, by_path))


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 8, 3), np.float32), "pass uint8 pixels"),
    (np.zeros((8, 8, 2), np.uint8), "pass uint8 pixels"),
    (3.5, "cannot use a float as an image"),
])
def test_bad_image_values(bad, match):
    with pytest.raises(MGJaxError, match=match):
        load_image(bad)


def test_corrupt_and_missing_files_name_the_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    for path in (bad, tmp_path / "missing.jpg"):
        with pytest.raises(MGJaxError, match=f"{path}: cannot read the image"):
            load_image(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    for image in (path, Image.open(path), np.zeros((200, 300, 3), np.uint8)):
        with pytest.raises(MGJaxError, match=r"60000 pixels\)? exceeds (the )?limit of 59999"):
            load_image(image)
    # twice the limit: PIL's own DecompressionBombError, reported the same way
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    with pytest.raises(MGJaxError, match=str(path)):
        load_image(path)


def test_an_empty_image_is_an_error():
    """0 x N pixels (an array, or PIL's own empty image): PIL would resize it without a word."""
    for image in (np.zeros((0, 5, 3), np.uint8), np.zeros((4, 0), np.uint8), Image.new("RGB", (0, 0))):
        with pytest.raises(MGJaxError, match="an empty image"):
            load_image(image)


# --- paths and the tokenizer ----------------------------------------------------------------------

def test_relative_path_survives_chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(CASE)
    model = mgjax.load_pretrained("MGM-7B-tiny", template="vicuna_v1")  # tokenizer not loaded yet
    monkeypatch.chdir(tmp_path)
    assert model.path.is_absolute()
    assert model.tokenize("USER: <image>\nhi")[0] == model.tokenizer.bos_token_id


def test_missing_tokenizer_files_fail_at_once(tmp_path, monkeypatch):
    ckpt = tmp_path / "MGM-7B"
    shutil.copytree(CASE / "MGM-7B-tiny", ckpt, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    shutil.copytree(CASE / "model_zoo", tmp_path / "model_zoo")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # for this test only: later tests keep it
    model = mgjax.load_pretrained(ckpt)
    assert model.config.template == "vicuna_v1"  # from the folder name
    t = time.time()
    with pytest.raises(MGJaxError, match=r"no tokenizer files \(expected tokenizer.json or tokenizer.model"):
        model.tokenizer
    assert time.time() - t < 10  # no network retries (those take minutes); a margin for a loaded machine


@pytest.mark.parametrize("kind,hd,side", [("gemma", False, "left"), ("yi", True, "left")])
def test_bucketed_logits_equal_the_exact_length_program(kind, hd, side):
    """Gemma, HD and left padding (right padding: the golden cases above): a batch of two prompts of
    different lengths (one padded) through `logits` (bucketed, sliced) equals the program compiled for
    the exact merged length."""
    import jax

    import tiny
    from mgjax.model import MGM, init_params
    from mgjax.pretrained import Pretrained

    config = tiny.mgm(kind, hd=hd, small=True, padding_side=side)
    module = MGM(config)
    model = Pretrained(config, init_params(module, jax.random.key(0)), module, CASE)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.lm.vocab_size, (2, 9)).astype(np.int32)
    ids[:, 2] = -200
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    s, sa = config.image_size, config.image_size_aux
    images = rng.uniform(-1.5, 2, (2, *(() if not hd else (config.num_views,)), s, s, 3)).astype(np.float32)
    aux = rng.uniform(-1.5, 2, (2, sa, sa, 3)).astype(np.float32)
    got = model.logits(ids, images, aux, mask)
    length = 8 + config.tokens_per_image
    assert got.shape == (2, length, config.lm.vocab_size)
    exact = jax.jit(lambda p: module.apply({"params": p}, ids, images, aux, mask, length=length)[0])(model.params)
    assert_close(got[0], exact[0], 1e-5, f"{kind} hd={hd} {side}: full row")
    n = 5 + config.tokens_per_image  # the padded row's merged length; its padding logits are undefined
    real = slice(0, n) if side == "right" else slice(length - n, length)
    assert_close(got[1, real], exact[1, real], 1e-5, f"{kind} hd={hd} {side}: padded row")
