"""The demo: a tiny MGM trained on the synthetic shapes (mgjax.data.synthetic), in minutes on a CPU.

`DEMO_CONFIG` is the model (`model.preset: demo`), `save_demo_tokenizer` the word-level tokenizer of its
vocabulary (`model.tokenizer: demo`), `heldout_accuracy` the score `make demo` prints: a held-out
question is answered right when greedy decoding from the prompt produces the answer's tokens.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.config import CLIPConfig, ConvNextConfig, IGNORE_INDEX, LMConfig, MGMConfig
from mgjax.data.synthetic import ANSWERS, CHANCE, COLOURS, POSITIONS, QUESTIONS, SHAPES, SyntheticShapes
from mgjax.data.templates import TEMPLATES
from mgjax.model import splice_labels

DEMO_CONFIG = MGMConfig(
    # CLIP: 56 px / 14 = 4 x 4 patches (16 visual tokens); ConvNeXt's 64 px stage-0 map gives 4 x 4 windows.
    vision=CLIPConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=56, patch_size=14),
    vision_aux=ConvNextConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), drop_path_rate=0.0),
    mm_hidden_size=64, mm_hidden_size_aux=80, image_size_aux=64,
    lm=LMConfig(vocab_size=128, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
                intermediate_size=256, max_position_embeddings=512),
    max_length=256, template="vicuna_v1")

_SPECIAL = ("<s>", "</s>", "<unk>")


def _words() -> list[str]:
    """Every word piece the demo's texts use, in both templates (Whitespace pre-tokenizer pieces)."""
    texts = [TEMPLATES[t].render(["q", "a"]) for t in ("vicuna_v1", "plain")]
    texts += [*QUESTIONS.values(), "Answer with one word.", "a at the", *COLOURS, *SHAPES, *POSITIONS,
              *(a for answers in ANSWERS.values() for a in answers)]
    pieces = {p for t in texts for p in re.findall(r"\w+|[^\w\s]+", t)}
    return sorted(pieces)


def save_demo_tokenizer(folder: str | os.PathLike) -> Path:
    """A word-level tokenizer of the demo's vocabulary (BOS added like Llama's), saved like an HF one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*_SPECIAL, *_words(), "\n"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    # legacy=True: "</s>" + the next round's text tokenize apart, as the original's label masking counts.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   legacy=True)
    fast.save_pretrained(str(folder))
    return Path(folder)


def heldout_accuracy(module, params, tokenizer, config: MGMConfig, num_samples: int = 128, seed: int = 0,
                     batch_size: int = 32) -> tuple[float, float]:
    """(accuracy, chance) on held-out synthetic questions (one per image, never seen in training).

    Teacher forcing over the answer tokens: every answer token is the argmax given the prompt and the
    answer tokens before it exactly when greedy decoding produces the answer, so one forward pass per
    batch scores greedy decoding. Chance: a uniform guess among each question type's answers.
    """
    from mgjax.data.pipeline import DataConfig, make_dataset

    source = SyntheticShapes(num_samples, split="heldout", stage=2, seed=seed, image_size=64)
    data = DataConfig(batch_size=batch_size, buckets=(64, 128), shuffle=False, group_by_modality_length=False,
                      num_epochs=1, num_threads=2)
    apply = jax.jit(lambda p, b, length: module.apply({"params": p}, b["input_ids"], b["images"], b["images_aux"],
                                                      b["attention_mask"], length=length), static_argnums=2)
    right = total = 0
    for batch in make_dataset(source, tokenizer, config, data):
        rows = batch["attention_mask"].any(1)
        length = batch["input_ids"].shape[1] + config.tokens_per_image
        logits, plan = apply(params, {k: jnp.asarray(v) for k, v in batch.items() if k != "sample_ids"}, length)
        labels = np.asarray(splice_labels(plan, jnp.asarray(batch["labels"])))
        pred = np.asarray(logits[:, :-1].argmax(-1))
        target = labels[:, 1:]
        ok = np.where(target == IGNORE_INDEX, True, pred == target).all(1)
        right += int(ok[rows].sum())
        total += int(rows.sum())
    kinds = [source.answer(i)[0][0] for i in range(num_samples)]
    return right / max(total, 1), float(np.mean([CHANCE[k] for k in kinds]))
