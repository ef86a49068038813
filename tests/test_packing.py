"""Packed rows (`segment_ids`): each sample of a packed row gets the logits and loss it has alone.

A packed row's positions restart at every segment, attention stays causal within a segment, a target
never crosses a segment boundary, and image slots are consumed as the data pipeline fills them: per row,
its placeholders in order, or one unused (zero) slot when the whole row has no placeholder. Checked with
hand-built rows for every tiny LLM family and end to end with a batch of the real pipeline (pack=True).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from helpers import GOLDEN
from mgjax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgjax.data.pipeline import DataConfig, make_dataset
from mgjax.data.records import modality_length
from mgjax.data.synthetic import SyntheticShapes
from mgjax.data.tokenize import load_tokenizer
from mgjax.model import MGM, abstract_params, splice_embeds, splice_labels, splice_plan
from mgjax.train.loss import next_token_loss, token_nll
from mgjax.train.step import loss_fn

RTOL = ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _model(config):
    """module, random parameters (no init compile: the tests only compare forwards), the jitted forward
    (logits, plan and the visual tokens) and the jitted text-side forward of one unpadded sample."""
    module = MGM(config)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = str(path[-1])
        if leaf.ndim == 1 and ("scale" in name or "weight" in name):
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, abstract_params(module))

    @functools.partial(jax.jit, static_argnames="length")
    def forward(params, ids, images, aux, mask, segments, length):
        (logits, plan), state = module.apply({"params": params}, ids, images, aux, mask, length=length,
                                             segment_ids=segments, mutable=["intermediates"])
        return logits, plan, state["intermediates"]["image_embeds"][0]

    def text_side(self, ids, image_embeds, length):
        plan = splice_plan(ids, jnp.ones_like(ids), config.tokens_per_image, length, config.padding_side)
        text = self.llm.embed(jnp.where(ids == IMAGE_TOKEN_INDEX, 0, ids))
        return self.llm(splice_embeds(plan, text, image_embeds), plan.positions, plan.valid), plan

    alone = jax.jit(lambda params, ids, embeds, length: module.apply({"params": params}, ids, embeds, length,
                                                                     method=text_side), static_argnums=3)
    return module, params, forward, alone


def _images(config, n, rng):
    s, sa = config.image_size, config.image_size_aux
    views = () if config.num_views == 1 else (config.num_views,)
    return (rng.standard_normal((n, *views, s, s, 3)).astype(np.float32),
            rng.standard_normal((n, sa, sa, 3)).astype(np.float32))


def _sample(config, rng, n_text, placeholders=()):
    """ids with IMAGE_TOKEN_INDEX at `placeholders`, labels supervised everywhere else (the first too)."""
    ids = rng.integers(3, config.lm.vocab_size, n_text).astype(np.int32)
    ids[list(placeholders)] = IMAGE_TOKEN_INDEX
    labels = np.where(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX, ids).astype(np.int32)
    images, aux = _images(config, len(placeholders), rng)
    return {"ids": ids, "labels": labels, "images": images, "aux": aux}


def _pack(config, rows, T, rng, spare=1):
    """rows: lists of samples -> a packed batch (right-padded to T), image slots filled as the pipeline
    does; unused slots (a text-only row's, the spare trailing ones) hold noise that must not matter."""
    B = len(rows)
    ids = np.zeros((B, T), np.int32)
    labels = np.full((B, T), IGNORE_INDEX, np.int32)
    mask, seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    imgs, auxs = [], []
    for b, row in enumerate(rows):
        pos = 0
        for k, s in enumerate(row, 1):
            n = len(s["ids"])
            ids[b, pos:pos + n], labels[b, pos:pos + n] = s["ids"], s["labels"]  # first label not masked
            mask[b, pos:pos + n], seg[b, pos:pos + n] = 1, k
            pos += n
            imgs += list(s["images"])
            auxs += list(s["aux"])
        if not any(len(s["images"]) for s in row):
            noise = _images(config, 1, rng)
            imgs.append(noise[0][0])
            auxs.append(noise[1][0])
    noise = _images(config, spare, rng)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "segment_ids": seg,
            "images": np.concatenate([np.stack(imgs), noise[0]]),
            "images_aux": np.concatenate([np.stack(auxs), noise[1]])}


def _alone(config, sample, embeds):
    """Logits [L, V] and the summed next-token NLL of one sample run by itself, unpadded, with the visual
    tokens `embeds` [n, N, D] of its images (an image's tokens do not depend on the other images of the
    batch: the packed forward's are reused, so that only the LLM side is compiled per sample length).
    A text-only sample gets one zero image that it does not use, like the original."""
    _, params, _, alone = _model(config)
    n = len(sample["ids"])
    n_img = int((sample["ids"] == IMAGE_TOKEN_INDEX).sum())
    assert len(embeds) == n_img
    length = n + n_img * (config.tokens_per_image - 1)
    embeds = embeds if n_img else jnp.zeros((1, *embeds.shape[1:]), embeds.dtype)
    logits, plan = alone(params, sample["ids"][None], embeds, length)
    nll, _ = token_nll(logits, splice_labels(plan, sample["labels"][None]))
    return np.asarray(logits[0]), float(nll.sum())


def _check_packed(config, batch, samples_by_row, length):
    """Every segment's logits equal its alone logits; the packed loss sum equals the per-sample sums.
    Image slots: per row, its samples' images in order, or one unused slot for a row without any."""
    _, params, forward, _ = _model(config)
    logits, plan, embeds = forward(params, batch["input_ids"], batch["images"], batch["images_aux"],
                                   batch["attention_mask"], batch["segment_ids"], length)
    logits, segments = np.asarray(logits), np.asarray(plan.segments)
    total, slot = 0.0, 0
    for b, row in enumerate(samples_by_row):
        assert sorted(set(segments[b]) - {0}) == list(range(1, len(row) + 1))
        for k, sample in enumerate(row, 1):
            n_img = int((sample["ids"] == IMAGE_TOKEN_INDEX).sum())
            want, nll = _alone(config, sample, embeds[slot:slot + n_img])
            slot += n_img
            np.testing.assert_allclose(logits[b, segments[b] == k], want, rtol=RTOL, atol=ATOL,
                                       err_msg=f"row {b} segment {k}")
            total += nll
        slot += not any((s["ids"] == IMAGE_TOKEN_INDEX).any() for s in row)
    nll, keep = token_nll(logits, splice_labels(plan, batch["labels"]), plan.segments)
    np.testing.assert_allclose(float(nll.sum()), total, rtol=RTOL)
    return logits, plan, keep


@pytest.mark.parametrize("kind", list(tiny.LMS))
def test_packed_rows_match_samples_alone(kind):
    config = tiny.mgm(kind)
    rng = np.random.default_rng(1)
    tpi = config.tokens_per_image
    a = _sample(config, rng, 7, placeholders=[1])  # image
    b = _sample(config, rng, 5)  # text-only, packed between two image samples: consumes no slot
    c = _sample(config, rng, 6, placeholders=[0, 4])  # two images, the first at the segment's start
    d = _sample(config, rng, 4)  # text-only row of two samples: the row consumes one unused slot
    e = _sample(config, rng, 3)
    f = _sample(config, rng, 9, placeholders=[8])  # text-only then image
    rows = [[a, b, c], [d, e], [b, f]]
    batch = _pack(config, rows, T=22, rng=rng)
    assert batch["images"].shape[0] == 3 + 1 + 1 + 1  # a, c, c | zero slot | f | spare
    length = 7 + 5 + 6 + 3 * (tpi - 1) + 2  # the longest merged row, plus padding
    logits, plan, keep = _check_packed(config, batch, rows, length)

    # Positions restart per segment, visual tokens carry their placeholder's segment, padding is 0.
    pos, seg = np.asarray(plan.positions), np.asarray(plan.segments)
    la, lb = 7 + tpi - 1, 5
    np.testing.assert_array_equal(pos[0, :la + lb + 2], [*range(la), *range(lb), 0, 1])
    assert (seg[0, :la] == 1).all() and (seg[0, la:la + lb] == 2).all() and (seg[0, la + lb:-2] == 3).all()
    assert (seg[0, -2:] == 0).all() and (seg[1, 7:] == 0).all()
    # The targets across a boundary (supervised in these rows) are dropped: without segments they count.
    labels = splice_labels(plan, batch["labels"])
    assert int(keep.sum()) < int((np.asarray(labels)[:, 1:] != IGNORE_INDEX).sum())


def test_packed_rows_left_padding():
    """The model re-pads on the left (tokenizer_padding_side="left"): positions still restart per segment."""
    config = tiny.mgm("llama_3", padding_side="left")
    rng = np.random.default_rng(2)
    a, b, c = _sample(config, rng, 6, placeholders=[2]), _sample(config, rng, 4), _sample(config, rng, 3)
    rows = [[b, a], [c]]
    batch = _pack(config, rows, T=12, rng=rng, spare=0)
    _, plan, _ = _check_packed(config, batch, rows, 10 + config.tokens_per_image - 1 + 3)
    assert not np.asarray(plan.valid)[:, :3].any()  # left padding


def test_segment_ids_none_is_unchanged():
    """Without segment ids the plan has none and nothing else changes (the golden and parity tests check
    that path against the original); one segment per row (what the pipeline gives without packing) gives
    the same logits at every real position, and the same loss."""
    config = tiny.mgm("gemma")
    batch = tiny.batch(config, rows=3, length=10)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    plain = splice_plan(ids, mask, config.tokens_per_image, 30, "right")
    assert plain.segments is None
    one = splice_plan(ids, mask, config.tokens_per_image, 30, "right", segment_ids=mask)
    for name in ("token", "image_row", "is_image", "valid", "positions"):
        np.testing.assert_array_equal(getattr(one, name), getattr(plain, name), err_msg=name)
    np.testing.assert_array_equal(one.segments, plain.valid.astype(np.int32))

    params, forward = _model(config)[1:3]
    logits, _, _ = forward(params, ids, batch["images"], batch["images_aux"], mask, None, 30)
    seg_logits, seg_plan, _ = forward(params, ids, batch["images"], batch["images_aux"], mask, mask, 30)
    valid = np.asarray(plain.valid)
    np.testing.assert_allclose(np.asarray(seg_logits)[valid], np.asarray(logits)[valid], rtol=RTOL, atol=ATOL)
    labels = splice_labels(plain, batch["labels"])
    np.testing.assert_allclose(next_token_loss(seg_logits, labels, seg_plan.segments),
                               next_token_loss(logits, labels), rtol=RTOL)


class _MixedShapes:
    """SyntheticShapes image samples with text-only records between them (a source: len, [i], lengths)."""

    def __init__(self, n):
        shapes = SyntheticShapes(n, seed=4, image_size=32)
        text = [{"id": f"text-{i}", "images": [],
                 "conversations": [{"from": "human", "value": f"Say {'yes' if i % 2 else 'no'} {i} times."},
                                   {"from": "gpt", "value": "yes " * (i + 1)}]} for i in range(n // 2)]
        self.records = [r for i in range(n) for r in ([shapes[i]] + ([text[i // 2]] if i % 2 else []))]
        self.lengths = np.asarray([modality_length(r) for r in self.records], np.int32)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def test_pipeline_packed_batch_end_to_end():
    """A pack=True batch of the real pipeline: image slots as the model consumes them, segment logits
    and losses as each sample alone, and the training step's loss is their token mean."""
    tok = load_tokenizer(GOLDEN / "llama_vicuna" / "MGM-7B-tiny")
    config = dataclasses.replace(tiny.mgm("vicuna"), lm=tiny.lm("vicuna", vocab_size=len(tok)))
    source = _MixedShapes(6)
    data = DataConfig(batch_size=2, image_capacity=6, buckets=(128, 256), pack=True, shuffle=False,
                      num_threads=2, prefetch=4)
    batch = next(iter(make_dataset(source, tok, config, data)))

    # Cut the batch back into samples, taking each row's images from the slots in order (a row without
    # placeholders skips one slot).
    rows, slot, text_only_beside_image = [], 0, False
    for b in range(batch["input_ids"].shape[0]):
        row, seg = [], batch["segment_ids"][b]
        for k in range(1, seg.max() + 1):
            ids, labels = batch["input_ids"][b][seg == k], batch["labels"][b][seg == k]
            n = int((ids == IMAGE_TOKEN_INDEX).sum())
            row.append({"ids": ids, "labels": labels, "images": batch["images"][slot:slot + n],
                        "aux": batch["images_aux"][slot:slot + n]})
            slot += n
        n_row = int((batch["input_ids"][b] == IMAGE_TOKEN_INDEX).sum())
        text_only_beside_image |= n_row > 0 and any(not len(s["images"]) for s in row)
        slot += n_row == 0
        rows.append(row)
    assert sum(len(r) for r in rows) > len(rows), "no row was packed"
    assert text_only_beside_image, "no text-only sample packed beside an image sample"
    assert not batch["images"][slot:].any()  # the unused trailing slots are zeros

    merged = batch["attention_mask"].sum(1) + (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(1) * (
        config.tokens_per_image - 1)
    length = int(merged.max())
    logits, plan, keep = _check_packed(config, batch, rows, length)
    module, params = _model(config)[:2]
    nll, _ = token_nll(logits, splice_labels(plan, batch["labels"]), plan.segments)
    batch.pop("sample_ids")  # the loop logs them; the model never sees them
    step_loss = jax.jit(lambda p, b: loss_fn(module, p, b, length))(params, batch)  # reads segment_ids
    np.testing.assert_allclose(step_loss, nll.sum() / keep.sum(), rtol=RTOL)
