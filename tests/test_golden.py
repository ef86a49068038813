"""End-to-end parity with the original PyTorch MGM code (golden fixtures, float32 CPU).

Tolerances: the original's own run-to-run noise is ~1e-6 on preprocessing and vision and a few 1e-6
on logits (fixtures README); every float check below allows 1e-5 x the output's max magnitude, and
ids, labels and masks must match exactly.
"""

import dataclasses
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mgjax.model import MGM, splice_labels
from mgjax.train.loss import next_token_loss
from helpers import CASES, GOLDEN, assert_close, golden_model, nhwc


@functools.cache
def load_case(name):
    folder = GOLDEN / name
    model = golden_model(name)
    return dict(name=name, folder=folder, model=model, meta=json.loads((folder / "case.json").read_text()),
                ref=dict(np.load(folder / "expected.npz")))


@pytest.fixture(params=list(CASES))
def case(request):
    return load_case(request.param)


def _forward(model, ids, images, images_aux, mask, length, module=None):
    module = module or model.module
    (logits, plan), state = module.apply({"params": model.params}, jnp.asarray(ids), jnp.asarray(images),
                                         jnp.asarray(images_aux), jnp.asarray(mask), length=length,
                                         mutable=["intermediates"])
    return logits, plan, {k: v[0] for k, v in state["intermediates"].items()}


def test_preprocess_matches_original(case):
    images, images_aux = case["model"].preprocess(Image.open(case["folder"] / "input.jpg"))
    assert_close(images, nhwc(case["ref"]["images"][0]), 1e-5, "images")
    assert_close(images_aux, nhwc(case["ref"]["images_aux"][0]), 1e-5, "images_aux")


def test_prompt_ids_match_original(case):
    ids = case["model"].tokenize(case["meta"]["prompt"])
    np.testing.assert_array_equal(ids, case["ref"]["input_ids"][0])


def test_every_intermediate_and_logits(case):
    ref = case["ref"]
    ids = ref["input_ids"]
    logits, plan, it = _forward(case["model"], ids, nhwc(ref["images"]), nhwc(ref["images_aux"]),
                                np.ones_like(ids), ref["logits"].shape[1])
    assert_close(it["clip_features"][:, 0], ref["clip_features"], what="clip_features")
    for k in range(4):
        assert_close(it["aux_stages"][k], nhwc(ref[f"aux_stage_{k}"]), what=f"aux_stage_{k}")
    assert_close(it["aux_map"], nhwc(ref["aux_features"]), what="aux_features")
    mined = it["projector_in"] - it["clip_features"][:, 0]
    assert_close(mined, ref["resampler_out_aux"], what="mining output")
    assert_close(it["projector_in"], ref["projector_in"], what="projector_in")
    assert_close(it["image_embeds"], ref["image_embeds"], what="image_embeds")
    assert_close(it["inputs_embeds"], ref["inputs_embeds"], what="inputs_embeds")
    np.testing.assert_array_equal(plan.valid, ref["mm_attention_mask"].astype(bool))
    np.testing.assert_array_equal(plan.positions, ref["mm_position_ids"])
    assert_close(logits, ref["logits"], what="logits")
    # The public API gives the same numbers, and the first greedy token is the original's.
    api = case["model"].logits(ids, nhwc(ref["images"]), nhwc(ref["images_aux"]))
    assert_close(api, ref["logits"], what="Pretrained.logits")
    assert_close(api[0, -1], ref["generate_scores"][0], what="first generation step scores")
    assert int(np.argmax(api[0, -1])) == int(ref["generate_ids"][0, 0])


def test_training_forward_labels_and_loss(case):
    ref = case["ref"]
    logits, plan, _ = _forward(case["model"], ref["train_input_ids"], nhwc(ref["images"]), nhwc(ref["images_aux"]),
                               ref["train_attention_mask"], ref["train_labels_mm"].shape[1])
    labels = splice_labels(plan, jnp.asarray(ref["train_labels"]))
    np.testing.assert_array_equal(labels, ref["train_labels_mm"])
    assert_close(logits, ref["train_logits"], what="train_logits")
    assert_close(next_token_loss(logits, labels), ref["train_loss"], what="train_loss")


def test_text_only_sample_consumes_a_zero_image():
    case = load_case("llama_vicuna")  # only case A has a text-only sample
    ref = case["ref"]
    c = case["model"].config
    images = np.zeros((1, c.image_size, c.image_size, 3), np.float32)
    aux = np.zeros((1, c.image_size_aux, c.image_size_aux, 3), np.float32)
    ids = ref["text_input_ids"]
    logits, plan, _ = _forward(case["model"], ids, images, aux, np.ones_like(ids), ids.shape[1])
    labels = splice_labels(plan, jnp.asarray(ref["text_labels"]))
    assert_close(logits, ref["text_logits"], what="text_logits")
    assert_close(next_token_loss(logits, labels), ref["text_loss"], what="text_loss")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_of_two(side):
    """Case A's batch: two prompts left-padded with the pad id, re-padded on `side` after splicing
    (the original with position ids given); each row's last real token gives its logits."""
    case = load_case("llama_vicuna")
    ref, model = case["ref"], case["model"]
    module = MGM(dataclasses.replace(model.config, padding_side=side))
    ids, mask = ref["batch_input_ids"], ref["batch_attention_mask"]
    want_mask = ref[f"batch_{side}_posgiven_mm_attention_mask"]
    logits, plan, _ = _forward(model, ids, nhwc(ref["batch_images"]), nhwc(ref["batch_images_aux"]), mask,
                               want_mask.shape[1], module=module)
    np.testing.assert_array_equal(plan.valid, want_mask.astype(bool))
    np.testing.assert_array_equal(np.where(plan.valid, plan.positions, 0),
                                  ref[f"batch_{side}_posgiven_mm_position_ids"])
    last = want_mask.shape[1] - 1 - np.argmax(want_mask[:, ::-1], axis=1)
    assert_close(np.asarray(logits)[np.arange(2), last], ref[f"batch_{side}_posgiven_last_logits"],
                 what=f"{side}-padded last-token logits")
    # and each row equals the prompt run alone (the original's batch-of-one results)
    assert_close(np.asarray(logits)[np.arange(2), last], ref["batch_single_last_logits"], what="batch vs single")
