"""`splice_plan` + `splice_embeds` + `splice_labels` against a plain transcription of the original
MGM `prepare_inputs_labels_for_multimodal` (loops over rows, boolean masks, concatenation).

Random batches (fixed seeds): 1-4 rows, up to 20 ids, 0-2 `<image>` placeholders per row, left or right
input padding per row, re-padding on either side, truncation, 1/3/4 tokens per image. Everything is
a gather, so embeddings, labels, the mask and the positions must match exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgjax.model import merged_lengths, splice_embeds, splice_labels, splice_plan

V, D = 50, 6


def original_splice(ids, mask, labels, table, image_features, max_length, padding_side):
    """The original algorithm, row by row. image_features [num_images, N, D].
    Returns embeds [B, L, D], labels [B, L], attention mask [B, L], position ids [B, L], the untruncated
    row lengths and (bookkeeping, not in the original) which positions hold image features."""
    n = image_features.shape[1]
    rows, row_labels, row_images, full = [], [], [], []
    cur_image = 0
    for b in range(ids.shape[0]):
        keep = mask[b].astype(bool)  # strip padding
        cur_ids, cur_labels = ids[b][keep], labels[b][keep]
        at = np.flatnonzero(cur_ids == IMAGE_TOKEN_INDEX)
        if len(at) == 0:  # text only: still consumes one image, adds no tokens
            embeds, labs, is_img = table[cur_ids], cur_labels, np.zeros(len(cur_ids), bool)
            cur_image += 1
        else:
            bounds = [-1, *at.tolist(), len(cur_ids)]
            parts, part_labels, part_images = [], [], []
            for i in range(len(bounds) - 1):
                seg = slice(bounds[i] + 1, bounds[i + 1])
                parts.append(table[cur_ids[seg]])
                part_labels.append(cur_labels[seg])
                part_images.append(np.zeros(len(cur_labels[seg]), bool))
                if i < len(at):
                    parts.append(image_features[cur_image])
                    part_labels.append(np.full(n, IGNORE_INDEX))
                    part_images.append(np.ones(n, bool))
                    cur_image += 1
            embeds, labs, is_img = np.concatenate(parts), np.concatenate(part_labels), np.concatenate(part_images)
        full.append(len(embeds))
        rows.append(embeds[:max_length])  # tokenizer_model_max_length truncation
        row_labels.append(labs[:max_length])
        row_images.append(is_img[:max_length])
    L = max(len(r) for r in rows)
    B = len(rows)
    out = np.zeros((B, L, table.shape[1]), table.dtype)
    out_labels = np.full((B, L), IGNORE_INDEX, labels.dtype)
    attn = np.zeros((B, L), bool)
    pos = np.zeros((B, L), np.int64)
    images = np.zeros((B, L), bool)
    for b, (e, lab, img) in enumerate(zip(rows, row_labels, row_images)):
        k = len(e)
        if k == 0:
            continue
        sl = slice(L - k, L) if padding_side == "left" else slice(0, k)
        out[b, sl], out_labels[b, sl], attn[b, sl], pos[b, sl], images[b, sl] = e, lab, True, np.arange(k), img
    return out, out_labels, attn, pos, np.array(full), images


def random_case(seed):
    rng = np.random.RandomState(seed)
    B, T = rng.randint(1, 5), rng.randint(1, 21)
    ids = rng.randint(0, V, (B, T))
    mask = np.zeros((B, T), np.int32)
    labels = np.where(rng.rand(B, T) < 0.3, IGNORE_INDEX, rng.randint(0, V, (B, T)))
    for b in range(B):
        real = rng.randint(0 if b else 1, T + 1)  # row 0 is never empty; others rarely are
        left = rng.rand() < 0.5  # input padding side, per row
        where = np.arange(T - real, T) if left else np.arange(real)
        mask[b, where] = 1
        k = min(rng.choice([0, 1, 2]), real)
        ids[b, rng.choice(where, k, replace=False)] = IMAGE_TOKEN_INDEX
        pads = np.flatnonzero(mask[b] == 0)
        if len(pads) and rng.rand() < 0.3:  # a placeholder id under padding must be ignored
            ids[b, rng.choice(pads)] = IMAGE_TOKEN_INDEX
    n = int(rng.choice([1, 3, 4]))
    needed = int(np.maximum(((ids == IMAGE_TOKEN_INDEX) & (mask != 0)).sum(1), 1).sum())
    images = rng.randn(needed + rng.randint(0, 2), n, D).astype(np.float32)  # sometimes one spare image
    table = rng.randn(V, D).astype(np.float32)
    longest = int(np.asarray(merged_lengths(ids, mask, n)).max())
    max_length = longest + rng.randint(0, 3) if rng.rand() < 0.5 else rng.randint(1, longest + 1)
    side = "left" if rng.rand() < 0.5 else "right"
    return ids, mask, labels, table, images, max_length, side


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def mgjax_splice(ids, mask, labels, table, images, n, length, side):
    plan = splice_plan(ids, mask, n, length, side)
    text = table[jnp.where(ids == IMAGE_TOKEN_INDEX, 0, ids)]
    return plan, splice_embeds(plan, text, images), splice_labels(plan, labels)


@pytest.mark.parametrize("seed", range(24))
def test_splice_matches_original(seed):
    ids, mask, labels, table, images, max_length, side = random_case(seed)
    n = images.shape[1]
    want_embeds, want_labels, want_mask, want_pos, full, want_image = original_splice(
        ids, mask, labels, table, images, max_length, side)
    np.testing.assert_array_equal(merged_lengths(ids, mask, n), full)
    length = int(min(full.max(), max_length))
    assert length == want_embeds.shape[1]

    plan, embeds, spliced = mgjax_splice(ids, mask, labels, table, images, n, length, side)

    np.testing.assert_array_equal(np.asarray(plan.valid), want_mask)
    np.testing.assert_array_equal(np.asarray(embeds), want_embeds)
    np.testing.assert_array_equal(np.asarray(spliced), want_labels)
    np.testing.assert_array_equal(np.where(want_mask, np.asarray(plan.positions), 0), want_pos)
    np.testing.assert_array_equal(np.asarray(plan.is_image), want_image)


def test_cases_cover_the_interesting_settings():
    """The seeds above do hit every setting the module docstring promises."""
    seen = set()
    for seed in range(24):
        ids, mask, labels, table, images, max_length, side = random_case(seed)
        n = images.shape[1]
        img = (ids == IMAGE_TOKEN_INDEX) & (mask != 0)
        full = np.asarray(merged_lengths(ids, mask, n))
        seen |= {f"side={side}", f"n={n}", f"B={ids.shape[0]}"}
        seen |= {f"placeholders={k}" for k in img.sum(1)}
        seen |= {"left-padded input" for b in range(ids.shape[0]) if mask[b, 0] == 0 and mask[b].any()}
        seen |= {"right-padded input" for b in range(ids.shape[0]) if mask[b, -1] == 0 and mask[b].any()}
        if max_length < full.max():
            seen.add("truncated")
        if images.shape[0] > np.maximum(img.sum(1), 1).sum():
            seen.add("spare image")
        if ((ids == IMAGE_TOKEN_INDEX) & (mask == 0)).any():
            seen.add("placeholder under padding")
    want = {"side=left", "side=right", "n=1", "n=3", "n=4", "B=1", "B=4", "placeholders=0", "placeholders=1",
            "placeholders=2", "left-padded input", "right-padded input", "truncated", "spare image",
            "placeholder under padding"}
    assert want <= seen, want - seen
