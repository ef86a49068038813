"""Chunk-wise tokenization around `<image>` (the original's `tokenizer_image_token`)."""

from __future__ import annotations

from mgjax.config import IMAGE_TOKEN_INDEX

IMAGE_MARKER = "<image>"


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
