"""What differs between the released LLMs, as data, and how a checkpoint's template is recognised.

`ARCHS` holds what the decoder needs per architecture (`LMConfig.family`); `LLMS` holds one row per
released base LLM: its architecture, conversation template, stop tokens, and the evidence that
identifies it in a checkpoint (tokenizer special tokens, folder names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Arch:
    """Decoder switches of one architecture, and the HF config defaults it implies."""

    gemma_norm: bool  # RMSNorm scales by (1 + w), in float32
    scale_embeddings: bool  # input embeddings (image tokens too) times sqrt(hidden)
    tie_word_embeddings: bool  # when config.json does not say
    activation: str  # when config.json does not say
    norm_eps: float  # when config.json does not say
    model_type: str  # what a released MGM config.json of this family says
    architecture: str


ARCHS = {
    "llama": Arch(gemma_norm=False, scale_embeddings=False, tie_word_embeddings=False, activation="silu",
                  norm_eps=1e-5, model_type="mgm", architecture="MGMLlamaForCausalLM"),
    "gemma": Arch(gemma_norm=True, scale_embeddings=True, tie_word_embeddings=True, activation="gelu",
                  norm_eps=1e-6, model_type="mgm_gemma", architecture="MGMGemmaForCausalLM"),
    "mixtral": Arch(gemma_norm=False, scale_embeddings=False, tie_word_embeddings=False, activation="silu",
                    norm_eps=1e-5, model_type="mgm_mixtral", architecture="MGMMixtralForCausalLM"),
}


@dataclass(frozen=True)
class LLM:
    """A released MGM base LLM."""

    arch: str
    template: str
    stop_tokens: tuple[str, ...]  # generation stops at any of these (those the tokenizer has)
    markers: tuple[str, ...]  # special tokens whose presence in the tokenizer identifies this LLM
    folder: str  # regex (lower case) on checkpoint folder names: MGM-8B-HD, MGM-Pretrain/MGM-34B, ...


LLMS = {
    "llama_3": LLM("llama", "llama_3", ("<|eot_id|>", "<|end_of_text|>"), ("<|eot_id|>", "<|start_header_id|>"),
                   r"llama-?3|(?<![\dx.])8b"),
    "yi": LLM("llama", "chatml_direct", ("<|im_end|>", "<|endoftext|>"), ("<|im_start|>",),
              r"(?<![a-z])yi(?![a-z])|hermes|(?<![\dx.])34b"),
    "gemma": LLM("gemma", "gemma", ("<end_of_turn>", "<eos>"), ("<start_of_turn>",), r"gemma|(?<![\dx.])2b"),
    "mixtral": LLM("mixtral", "mistral_instruct", ("</s>",), (), r"mixtral|8x7b"),
    # Last: the one Llama-family release whose tokenizer carries no chat markers.
    "vicuna": LLM("llama", "vicuna_v1", ("</s>",), (), r"vicuna|(?<![\dx.])(7|13)b"),
}
DEFAULT_LLM = "vicuna"

TEMPLATE_ORDER = ("template= argument", "tokenizer special tokens", "model family", "folder name", "default")


def llm_of_template(template: str) -> LLM | None:
    return next((m for m in LLMS.values() if m.template == template), None)


def detect_template(family: str, tokens: Iterable[str] | None, folders: Iterable[str | Path]) -> tuple[str, str]:
    """The conversation template a checkpoint was trained with, and the evidence (`TEMPLATE_ORDER`):

    1. the tokenizer's special tokens (`<|eot_id|>` / `<|start_header_id|>` -> llama_3,
       `<|im_start|>` -> chatml_direct, `<start_of_turn>` -> gemma);
    2. the model family (gemma -> gemma, mixtral -> mistral_instruct);
    3. the released folder's name (`MGM-8B-HD` -> llama_3, `MGM-34B` -> chatml_direct, ...);
    4. vicuna_v1, the one Llama-family release without chat markers in its tokenizer.

    `tokens`: the tokenizer's vocabulary (any iterable of strings) or None when it has no files.
    """
    vocab = set(tokens or ())
    for m in LLMS.values():
        if any(t in vocab for t in m.markers):
            return m.template, f"tokenizer special token {next(t for t in m.markers if t in vocab)}"
    for m in LLMS.values():
        if m.arch == family and family != "llama":
            return m.template, f"model family {family}"
    names = [Path(f).name.lower() for f in folders if f]
    for m in LLMS.values():
        if m.arch == family and any(re.search(m.folder, n) for n in names):
            return m.template, f"folder name {next(n for n in names if re.search(m.folder, n))}"
    return LLMS[DEFAULT_LLM].template, "default (a Llama-family tokenizer without chat markers)"
