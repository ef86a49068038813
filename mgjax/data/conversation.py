"""Training conversations -> input ids and labels, exactly as the original's `preprocess_*` build them.

The original masks labels by re-tokenizing each round and counting tokens, with per-template offsets
(and, for some templates, a dependence on the tokenizer's `legacy` flag). The counts are reproduced
here rule for rule, including the fallback that masks a whole sample when the counts disagree
with the tokenized conversation ("tokenization mismatch"), so the released recipe's supervision is
reproduced token for token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from mgjax.config import IGNORE_INDEX
from mgjax.data.templates import get_template
from mgjax.data.tokenize import IMAGE_MARKER, tokenize_with_images
from mgjax.errors import MGJaxError

log = logging.getLogger(__name__)


def move_image_marker(value: str) -> str:
    """`<image>` moves to the start of its message, followed by a newline (original: preprocess_multimodal)."""
    if IMAGE_MARKER not in value:
        return value
    return (IMAGE_MARKER + "\n" + value.replace(IMAGE_MARKER, "").strip()).strip()


def tokenizer_legacy(tokenizer) -> bool:
    """The `legacy` flag the original's slow tokenizer had: tokenizer_config.json's value, else the
    slow LlamaTokenizer default (True) for Llama-style SentencePiece tokenizers, else False."""
    cfg = Path(str(getattr(tokenizer, "name_or_path", ""))) / "tokenizer_config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        if d.get("legacy") is not None:
            return bool(d["legacy"])
        return "LlamaTokenizer" in str(d.get("tokenizer_class", ""))
    return bool(getattr(tokenizer, "legacy", False))


def pad_token_id(tokenizer, template: str) -> int:
    """The pad id the original's `train()` sets: the tokenizer's, else `<|reserved_special_token_0|>`
    for Llama-3, else the unk token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if template == "llama_3":
        return tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
    return tokenizer.unk_token_id


def render_conversation(turns: Sequence[Mapping[str, str]], template: str, has_image: bool) -> str:
    """LLaVA-format turns ({"from": "human" | "gpt", "value": ...}) -> the template's text."""
    values = [move_image_marker(t["value"]) if has_image else t["value"] for t in turns]
    froms = [t.get("from") for t in turns]
    if template == "plain":
        if len(turns) != 2 or IMAGE_MARKER not in values[0]:
            raise MGJaxError("a 'plain' (stage-1) sample must be one human turn with <image> and one gpt caption")
        return IMAGE_MARKER + values[1] + get_template("plain").sep
    if froms and froms[0] != "human":  # the original skips a leading non-human turn
        values, froms = values[1:], froms[1:]
    for j, f in enumerate(froms):
        if f != ("human", "gpt")[j % 2]:
            raise MGJaxError(f"conversation turn {j} is from {f!r}; turns must alternate human, gpt, ...")
    return get_template(template).render(values)


def conversation_to_ids(tokenizer, turns: Sequence[Mapping[str, str]], template: str, has_image: bool,
                        max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids with -200 placeholders, labels with IGNORE_INDEX) for one training sample."""
    text = render_conversation(turns, template, has_image)
    if has_image or template == "plain":
        ids = tokenize_with_images(tokenizer, text)
    else:
        ids = tokenizer(text, max_length=max_length, truncation=True).input_ids

    def n(s: str) -> int:
        return len(tokenize_with_images(tokenizer, s)) if has_image else len(tokenizer(s).input_ids)

    labels = list(ids)
    if template == "plain":
        k = len(tokenize_with_images(tokenizer, IMAGE_MARKER))
        labels[:k] = [IGNORE_INDEX] * k
        return ids, labels

    t = get_template(template)
    legacy = tokenizer_legacy(tokenizer)
    if t.style in ("mpt",):  # ChatML and Llama-3: rounds regrouped as [system+user+gpt], [user+gpt], ...
        rounds = text.split(t.sep)
        rounds = [t.sep.join(rounds[:3])] + [t.sep.join(rounds[i:i + 2]) for i in range(3, len(rounds), 2)]
        sep = t.sep + t.roles[1]
    else:
        rounds = text.split(t.sep2)
        sep = {"two": t.sep + t.roles[1] + ": ", "llama2": "[/INST] ",
               "gemma": f"<start_of_turn>{t.roles[1]}\n"}[t.style]
    cur = 0 if template == "chatml_direct" else 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        instruction = parts[0] + sep
        if template == "vicuna_v1":
            round_len, instr_len = n(rou), n(instruction) - 2
            if i != 0 and not legacy:
                round_len, instr_len = round_len - 1, instr_len - 1
        elif template == "mistral_instruct":
            round_len, instr_len = n(rou), n(instruction) - 2
        elif template == "gemma":
            round_len, instr_len = n(rou), n(instruction) - 1
        elif template == "chatml_direct":
            round_len, instr_len = n(rou), n(instruction) - 1
            if legacy:
                round_len, instr_len = round_len + 1, instr_len + 1
        else:  # llama_3: BOS counted once; <|eot_id|> (the split separator) supervised
            round_len, instr_len = n(rou), n(instruction) - 1
        labels[cur:cur + instr_len] = [IGNORE_INDEX] * len(labels[cur:cur + instr_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])

    total = sum(1 for x in ids if x != pad_token_id(tokenizer, template))
    if cur < max_length and cur != total:
        log.warning("tokenization mismatch: %d vs. %d tokens; the sample is fully masked as in the original "
                    "(template %s)", cur, total, template)
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels
