"""Chunk-wise tokenization around `<image>` (the original's `tokenizer_image_token`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from mgjax.config import IMAGE_TOKEN_INDEX
from mgjax.data.templates import IMAGE_MARKER
from mgjax.errors import MGJaxError
from mgjax.families import detect_template


def tokenize_with_images(tokenizer, prompt: str) -> list[int]:
    """Ids with one IMAGE_TOKEN_INDEX (-200) per `<image>`.

    Each chunk between markers is tokenized on its own; when the first chunk starts with BOS, one
    BOS is kept and the first id of every chunk (its BOS) is dropped, exactly as the original does.
    """
    chunks = [tokenizer(c).input_ids for c in prompt.split(IMAGE_MARKER)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


# A folder holds a tokenizer when it has one of these (tokenizer_config.json alone is not enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer in `folder`, from its files only (never the network)."""
    import transformers

    folder = Path(folder).expanduser().resolve()
    if not has_tokenizer(folder):
        raise MGJaxError(f"{folder}: no tokenizer files (expected {' or '.join(TOKENIZER_FILES)}, with "
                         "tokenizer_config.json); copy the base LLM's tokenizer files into this folder")
    # transformers warns that model_type "mgm" (config.json) is unknown to it: harmless for tokenizers.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MGJaxError(f"{folder}: the tokenizer files cannot be loaded ({type(e).__name__}: {e})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def checkpoint_template(family: str, tokenizer_dir: str | os.PathLike, folders) -> tuple[str, str, object]:
    """(template, evidence, tokenizer or None) of a released-layout checkpoint: `families.detect_template`
    on the tokenizer in `tokenizer_dir` (when it has one) and the `folders`' names."""
    tokenizer = load_tokenizer(tokenizer_dir) if has_tokenizer(tokenizer_dir) else None
    template, evidence = detect_template(family, tokenizer.get_vocab() if tokenizer else None, folders)
    return template, evidence, tokenizer
