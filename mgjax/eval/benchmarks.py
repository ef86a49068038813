"""The paper's benchmarks as LLaVA question files (MGM_SPEC section 10): prompt and decoding of each."""

from __future__ import annotations

from mgjax.eval.runner import Bench

SHORT = "Answer the question using a single word or phrase."


def _llava_text(q: dict) -> str:
    """LLaVA's question files (TextVQA with its OCR tokens, MME, POPE) carry the whole user text already."""
    return q["text"]


BENCHES = {
    "textvqa": Bench("textvqa", _llava_text, 128),
    "mme": Bench("mme", _llava_text, 128),
    "pope": Bench("pope", _llava_text, 128),
    "mmvet": Bench("mmvet", _llava_text, 1024),  # the raw question; GPT-4 grades the answers
}
