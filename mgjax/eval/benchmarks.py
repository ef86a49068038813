"""The paper's benchmarks (MGM_SPEC section 10): the question file of each and how it is prompted and
decoded."""

from __future__ import annotations

import base64
import csv
import os
import sys

from mgjax.errors import MGJaxError
from mgjax.eval.runner import Bench

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCD"  # MMBench's option columns


def _llava_text(q: dict) -> str:
    """LLaVA's question files (TextVQA with its OCR tokens, MME, POPE) carry the whole user text already."""
    return q["text"]


def _present(value) -> bool:
    """An MMBench cell that holds something (pandas writes missing cells as empty or 'nan')."""
    return value is not None and str(value).strip().lower() not in ("", "nan", "none")


def read_mmbench(path: str | os.PathLike) -> list[dict]:
    """MMBench's TSV (index, question, hint, A..D, answer, category, image as base64, ...) -> one question
    record per row, prompted as LLaVA's `model_vqa_mmbench --single-pred-prompt` (MGM_SPEC 10): hint,
    question, an `X. option` line per option (up to the first missing one), the letter instruction. The
    circular variants of a question are rows of the TSV itself (index + k * 1e6, the options shifted)."""
    csv.field_size_limit(sys.maxsize)  # the images are long cells
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as e:
        raise MGJaxError(f"{path}: cannot read the MMBench TSV ({e.strerror})") from None
    records = []
    for n, row in enumerate(rows, 2):
        try:
            options = []
            for c in OPTION_LETTERS:
                if not _present(row.get(c)):
                    break
                options.append(row[c])
            image = base64.b64decode(row["image"], validate=True)
            index = int(row["index"])
            text = f"{row['hint']}\n{row['question']}" if _present(row.get("hint")) else row["question"]
        except (KeyError, ValueError, TypeError) as e:
            raise MGJaxError(f"{path} line {n}: not an MMBench row ({type(e).__name__}: {e}); it needs index, "
                             "question, A, B, ..., image (base64)") from None
        text += "".join(f"\n{c}. {o}" for c, o in zip(OPTION_LETTERS, options))
        answer = row.get("answer")
        records.append({"question_id": index, "text": f"{text}\n{LETTER}", "prompt": text, "image_bytes": [image],
                        "options": options, "category": row.get("category"),
                        "answer": answer if _present(answer) else None,
                        "row": {k: v for k, v in row.items() if k != "image"}})
    return records


def read_scienceqa(path: str | os.PathLike) -> list[dict]:
    """LLaVA's ScienceQA question file (`llava_test_CQM-A.json`: id, image for the IMG questions, the human
    turn "Context: ... Question: ... Options: (A) ... <image>") -> question records."""
    import json

    try:
        rows = json.loads(open(path).read())
        return [{"question_id": r["id"], **({"image": r["image"]} if r.get("image") else {}),
                 "text": r["conversations"][0]["value"].replace("<image>", "").strip()} for r in rows]
    except OSError as e:
        raise MGJaxError(f"{path}: cannot read the questions ({e.strerror})") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise MGJaxError(f"{path}: not LLaVA's ScienceQA question file ({type(e).__name__}: {e})") from None


BENCHES = {
    "textvqa": Bench("textvqa", _llava_text, 128),
    "mme": Bench("mme", _llava_text, 128),
    "pope": Bench("pope", _llava_text, 128),
    "mmvet": Bench("mmvet", _llava_text, 1024),  # the raw question; GPT-4 grades the answers
    # LLaVA's model_vqa_science --single-pred-prompt (its budget: 1024)
    "scienceqa": Bench("scienceqa", lambda q: f"{q['text']}\n{LETTER}", 1024),
    # LLaVA's answer line: the prompt without the instruction, round 0, the options and their letters
    "mmbench": Bench("mmbench", _llava_text, 1024, answer_fields=lambda q: {
        "prompt": q["prompt"], "round_id": 0, "options": q["options"],
        "option_char": list(OPTION_LETTERS[:len(q["options"])])}),
}
