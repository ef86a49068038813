"""Tiny model configs shared by the tests: one LLM built like each released family, and towers.

The LLMs keep each release's distinguishing structure at toy width: Vicuna (MHA), Llama-3 (GQA,
rope theta 5e5), Yi (GQA, rope theta 5e6), Gemma (MQA with one KV head, head_dim 2x hidden/heads,
GeGLU, tied head, scaled embeddings) and Mixtral (4 experts, top-2). Every family has 8 query heads
so that each runs on a tensor axis of 1, 2, 4 or 8.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mgjax.config import CLIPConfig, ConvNextConfig, LMConfig, MGMConfig

# CLIP: 56 px / 14 = 4 x 4 patches (16 visual tokens); ConvNeXt stage-0 map 64 / 4 = 16 -> 4 x 4 windows.
CLIP = CLIPConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=56, patch_size=14)
CONVNEXT = ConvNextConfig(depths=(1, 1, 2, 1), dims=(4, 8, 12, 16), drop_path_rate=0.0)
TOWERS = dict(vision=CLIP, vision_aux=CONVNEXT, mm_hidden_size=32, mm_hidden_size_aux=40, image_size_aux=64)
# Smallest towers the layouts allow (2 x 2 CLIP patches of 8 x 8 mined windows, 2-layer CLIP): for the
# compile-heavy sharded tests; 8 CLIP heads so that it runs on a tensor axis of 8).
SMALL_TOWERS = dict(vision=CLIPConfig(32, 64, 2, 8, 28, 14), vision_aux=ConvNextConfig((1, 1, 1, 1), (4, 8, 12, 16)),
                    mm_hidden_size=32, mm_hidden_size_aux=40, image_size_aux=64)

_LM = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, head_dim=8, intermediate_size=128)
LMS = {
    "vicuna": LMConfig(**_LM, num_kv_heads=8),
    "llama_3": LMConfig(**_LM, num_kv_heads=2, rope_theta=5e5),
    "yi": LMConfig(**_LM, num_kv_heads=2, rope_theta=5e6),
    "gemma": LMConfig(**{**_LM, "head_dim": 16}, family="gemma", num_kv_heads=1, activation="gelu",
                      tie_word_embeddings=True, norm_eps=1e-6),
    "mixtral": LMConfig(**{**_LM, "intermediate_size": 96}, family="mixtral", num_kv_heads=2, rope_theta=1e6,
                        num_experts=4, num_experts_per_tok=2),
}
# The template each released LLM uses (docs/mgm_spec.md section 1).
TEMPLATE = {"vicuna": "vicuna_v1", "llama_3": "llama_3", "yi": "chatml_direct", "gemma": "gemma",
            "mixtral": "mistral_instruct"}


def lm(kind: str, **changes) -> LMConfig:
    return dataclasses.replace(LMS[kind], **changes)


def mgm(kind: str = "vicuna", hd: bool = False, small: bool = False, **changes) -> MGMConfig:
    """A tiny MGM with the LLM of `kind`; `hd` gives the 2 x 2 grid + global view (5 views)."""
    towers = SMALL_TOWERS if small else TOWERS
    hd_fields = dict(image_grid=2, image_global=True, image_size_aux=2 * towers["image_size_aux"]) if hd else {}
    return MGMConfig(**{"lm": LMS[kind], "template": TEMPLATE[kind], **towers, **hd_fields, **changes})


# Special tokens of each released LLM's tokenizer (what template detection reads), bos / eos first.
SPECIAL_TOKENS = {
    "vicuna": ("<s>", "</s>", "<unk>"),
    "mixtral": ("<s>", "</s>", "<unk>"),
    "llama_3": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|reserved_special_token_0|>"),
    "yi": ("<|startoftext|>", "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"),
    "gemma": ("<bos>", "<eos>", "<pad>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
}


def save_tokenizer(kind: str, folder) -> None:
    """A small word-level tokenizer with the special tokens of `kind`'s tokenizer, saved like an HF
    checkpoint's (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS[kind]
    words = ["a", "b", "image", "what", "is", "this", "USER", "ASSISTANT", ":", "?", "\n"]
    vocab = {t: i for i, t in enumerate((*special, *words, "[UNK]"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[1],
                                   unk_token="[UNK]", additional_special_tokens=list(special[2:]))
    fast.save_pretrained(str(folder))


def batch(config: MGMConfig, rows: int = 8, length: int = 12, seed: int = 0) -> dict:
    """A training batch: random ids with an image at position 3, a right-padded row, ~70% supervised."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.lm.vocab_size, (rows, length)).astype(np.int32)
    ids[:, 3] = -200
    mask = np.ones((rows, length), np.int32)
    mask[1, -3:] = 0
    labels = np.where(rng.random((rows, length)) < 0.7, ids, -100).astype(np.int32)
    labels[:, 3] = -100
    s, sa = config.image_size, config.image_size_aux
    views = () if config.num_views == 1 else (config.num_views,)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "images": rng.standard_normal((rows, *views, s, s, 3)).astype(np.float32),
            "images_aux": rng.standard_normal((rows, sa, sa, 3)).astype(np.float32)}
