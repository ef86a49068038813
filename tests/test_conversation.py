"""Templates, prompts and training labels against the original's (golden fixtures): rendered text,
ids and labels must be identical."""

import json

import numpy as np
import pytest

from mgjax.data.conversation import conversation_to_ids, render_conversation
from mgjax.data.templates import TEMPLATES, build_prompt
from mgjax.errors import MGJaxError
from helpers import GOLDEN, golden_model

TURNS = {
    "llama_vicuna": [("human", "<image>\nWhat is unusual about this image?"),
                     ("gpt", "The man is ironing clothes on the back of a moving taxi."),
                     ("human", "What color is the taxi?"), ("gpt", "The taxi is yellow.")],
    "gemma": [("human", "What is unusual about this image?\n<image>"),  # the marker moves to the front
              ("gpt", "A man irons clothes on a taxi in the street."),
              ("human", "Is it safe?"), ("gpt", "No, it is dangerous.")],
}
TEXT_TURNS = [("human", "What is the capital of the city in the picture?"),
              ("gpt", "I am not sure, but it looks like New York City."),
              ("human", "Thank you."), ("gpt", "You are welcome.")]


def _turns(pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def _case(name):
    folder = GOLDEN / name
    return (golden_model(name), json.loads((folder / "case.json").read_text()),
            np.load(folder / "expected.npz"))


@pytest.fixture(scope="module", params=list(TURNS))  # A-bf16 shares A's tokenizer and texts
def case(request):
    return (request.param, *_case(request.param))


def test_prompt_matches_original(case):
    name, model, meta, _ = case
    assert model.config.template == meta["conv_mode"]
    assert model.build_prompt(meta["question"]) == meta["prompt"]


def test_training_conversation_ids_and_labels(case):
    name, model, meta, ref = case
    turns = _turns(TURNS[name])
    assert render_conversation(turns, model.config.template, has_image=True) == meta["train_conversation"]
    ids, labels = conversation_to_ids(model.tokenizer, turns, model.config.template, True, model.config.max_length)
    np.testing.assert_array_equal(ids, ref["train_input_ids"][0])
    np.testing.assert_array_equal(labels, ref["train_labels"][0])


def test_text_only_conversation():
    model, meta, ref = _case("llama_vicuna")
    turns = _turns(TEXT_TURNS)
    assert render_conversation(turns, "vicuna_v1", has_image=False) == meta["text_conversation"]
    ids, labels = conversation_to_ids(model.tokenizer, turns, "vicuna_v1", False, model.config.max_length)
    np.testing.assert_array_equal(ids, ref["text_input_ids"][0])
    np.testing.assert_array_equal(labels, ref["text_labels"][0])


def test_batch_prompts():
    model, meta, ref = _case("llama_vicuna")
    for i, prompt in enumerate(meta["batch_prompts"]):
        ids = model.tokenize(prompt)
        mask = ref["batch_attention_mask"][i].astype(bool)
        np.testing.assert_array_equal(ids, ref["batch_input_ids"][i][mask])


@pytest.mark.parametrize("name,expected", [
    ("vicuna_v1", "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions. USER: <image>\nQ ASSISTANT: A</s>"
                  "USER: Q2 ASSISTANT:"),
    ("gemma", "<start_of_turn>user\n<image>\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n<eos>"
              "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n"),
    ("mistral_instruct", "[INST] <image>\nQ [/INST] A </s><s>[INST] Q2 [/INST]"),
    ("chatml_direct", "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|>"
                      "<|im_start|>assistant\nA<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"),
    ("llama_3", "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
                "You are able to understand the visual content that the user provides, and assist the user with a "
                "variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                "<image>\nQ<|eot_id|><|start_header_id|>system<|end_header_id|>\n\nA<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>system<|end_header_id|>"
                "\n\n"),
])
def test_multi_turn_templates(name, expected):
    """docs/mgm_spec.md section 7, multi-turn with the answer turn open (the original's conv.get_prompt())."""
    assert TEMPLATES[name].render(["<image>\nQ", "A", "Q2", None]) == expected
    assert build_prompt("Q", name) == TEMPLATES[name].render(["<image>\nQ", None])


def test_plain_stage1_sample():
    model, _, _ = _case("llama_vicuna")
    turns = _turns([("human", "Describe.\n<image>"), ("gpt", "a man ironing")])
    assert render_conversation(turns, "plain", True) == "<image>a man ironing\n"
    ids, labels = conversation_to_ids(model.tokenizer, turns, "plain", True, 2048)
    assert ids[:2] == [model.tokenizer.bos_token_id, -200]
    assert labels[:2] == [-100, -100] and labels[2:] == ids[2:]


def test_bad_conversations():
    with pytest.raises(MGJaxError, match="alternate"):
        render_conversation(_turns([("human", "a"), ("human", "b")]), "vicuna_v1", False)
    with pytest.raises(MGJaxError, match="plain"):
        render_conversation(_turns([("human", "a"), ("gpt", "b")]), "plain", True)
    with pytest.raises(MGJaxError, match="unknown conversation template"):
        build_prompt("Q", "alpaca")
