"""The paper's benchmarks (MGM_SPEC section 10): the question file of each and how it is prompted and
decoded."""

from __future__ import annotations

import ast
import base64
import csv
import os
import random
import sys

from mgjax.errors import MGJaxError
from mgjax.eval.runner import Bench, read_rows
from mgjax.eval.scores import SHORT, option_letters

LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = option_letters(4)  # MMBench's option columns


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
    rows = read_rows(path)
    try:
        return [{"question_id": r["id"], **({"image": r["image"]} if r.get("image") else {}),
                 "text": r["conversations"][0]["value"].replace("<image>", "").strip()} for r in rows]
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise MGJaxError(f"{path}: not LLaVA's ScienceQA question file ({type(e).__name__}: {e})") from None


def _scienceqa_text(q: dict) -> str:
    return f"{q['text']}\n{LETTER}"


def _image_cell(cell) -> dict:
    """A row's image as the runner takes it: Parquet's {bytes, path} struct -> the bytes, a string -> a file
    under --images, nothing -> no image."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return {"image_bytes": [cell["bytes"]]}
    if isinstance(cell, str) and cell:
        return {"image": cell}
    return {}


MMMU_NO_IMAGE = "INVALID GENERATION FOR MULTIPLE IMAGE INPUTS"  # the original's answer to open questions


def read_mmmu(path: str | os.PathLike) -> list[dict]:
    """MMMU's rows (id, question, options as a Python list literal, answer, question_type, image_1..7) ->
    question records prompted as MMMU's `llava1.5` config does (MGM_SPEC 10): multiple-choice
    "{question}\n(A) ...\n(B) ...\n\n{LETTER}", open "{question}\n{SHORT}"; image_1 only, as the original
    feeds it. The subject is the id's middle (validation_Art_Theory_3 -> Art_Theory)."""
    records = []
    for n, row in enumerate(read_rows(path), 1):
        try:
            qid, question, qtype = str(row["id"]), row["question"], row["question_type"]
            options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
            if qtype not in ("multiple-choice", "open") or (qtype == "multiple-choice" and not options):
                raise ValueError(f"question_type {qtype!r} with {len(options)} options")
        except (KeyError, ValueError, SyntaxError, TypeError) as e:
            raise MGJaxError(f"{path} record {n}: not an MMMU row ({type(e).__name__}: {e}); it needs id, "
                             "question, options, question_type, image_1") from None
        letters = list(option_letters(len(options))) if qtype == "multiple-choice" else []
        if letters:
            text = f"{question}\n" + "".join(f"({c}) {o}\n" for c, o in zip(letters, options)) + f"\n{LETTER}"
        else:
            text = f"{question}\n{SHORT}"
        answer = row.get("answer")
        if isinstance(answer, str) and answer.startswith("["):  # several accepted open answers
            answer = ast.literal_eval(answer)
        records.append({"question_id": qid, "text": text, "question_type": qtype, "options": options,
                        "letters": letters, "answer": None if answer in (None, "", "?") else answer,
                        "subject": qid.split("_", 1)[-1].rsplit("_", 1)[0], **_image_cell(row.get("image_1"))})
    return records


def _mmmu_preset(q: dict) -> str | None:
    """The original does not ask the model a question without image_1: a random letter (seeded by the id
    here, so that a re-run agrees), or its fixed text for an open question. (MMMU's call_llava_engine_df cannot
    draw that letter: its model_utils.py imports the function `random`, which has no `choice`; every question of
    the Hugging Face data has image_1, so the original never takes this path.)"""
    if "image" in q or "image_bytes" in q:
        return None
    return random.Random(q["question_id"]).choice(q["letters"]) if q["letters"] else MMMU_NO_IMAGE


def mathvista_query(problem: dict) -> str:
    """MathVista's zero-shot query (its `build_query` without caption and OCR): the hint for the answer
    type, "Question: ..." with the unit, the choices; the data's own `query` field holds the same."""
    qtype, atype, precision = problem["question_type"], problem["answer_type"], problem.get("precision")
    if qtype == "multi_choice":
        hint = "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    elif atype == "integer":
        hint = ("Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, "
                "3, at the end.")
    elif atype == "float" and precision == 1:
        hint = ("Please answer the question requiring a floating-point number with one decimal place and provide "
                "the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    elif atype == "float" and precision == 2:
        hint = ("Please answer the question requiring a floating-point number with two decimal places and provide "
                "the final value, e.g., 1.23, 1.34, 1.45, at the end.")
    elif atype == "list":
        hint = ("Please answer the question requiring a Python list as an answer and provide the final list, "
                "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    else:
        raise MGJaxError(f"MathVista problem {problem.get('pid')!r}: no hint for question_type {qtype!r}, "
                         f"answer_type {atype!r}, precision {precision!r}")
    question = f"Question: {problem['question']}" + (f" (Unit: {problem['unit']})" if problem.get("unit") else "")
    lines = [f"Hint: {hint}", question]
    if problem.get("choices"):
        choices = problem["choices"]
        lines += ["Choices:", *(f"({c}) {o}" for c, o in zip(option_letters(len(choices)), choices))]
    return "\n".join(lines)


def read_mathvista(path: str | os.PathLike) -> list[dict]:
    """MathVista's problems (`testmini.json` {pid: problem}, its Parquet with `decoded_image`, or JSONL) ->
    question records: the problem's `query` (built by `mathvista_query` where absent), its image, and the
    problem itself for the scorer."""
    records = []
    for n, row in enumerate(read_rows(path), 1):
        try:
            problem = {k: v for k, v in row.items() if k != "decoded_image"}
            image = _image_cell(row.get("decoded_image")) or _image_cell(row.get("image"))
            records.append({"question_id": str(row["pid"]), "text": row.get("query") or mathvista_query(row),
                            **image, "problem": problem})
        except (KeyError, TypeError) as e:
            raise MGJaxError(f"{path} record {n}: not a MathVista problem ({type(e).__name__}: {e}); it needs "
                             "pid, question, question_type, answer_type, image (or query)") from None
    return records


BENCHES = {
    "textvqa": Bench("textvqa", _llava_text, 128),
    "mme": Bench("mme", _llava_text, 128),
    "pope": Bench("pope", _llava_text, 128),
    "mmvet": Bench("mmvet", _llava_text, 1024),  # the raw question; GPT-4 grades the answers
    # LLaVA's model_vqa_science --single-pred-prompt (its budget: 1024); its answer line's prompt starts "<image>\n"
    # for an image question, which eval_science_qa.py reads to count ScienceQA-IMG
    "scienceqa": Bench("scienceqa", _scienceqa_text, 1024, answer_fields=lambda q: {
        "prompt": ("<image>\n" if "image" in q else "") + _scienceqa_text(q)}),
    # LLaVA's answer line: the prompt without the instruction, round 0, the options and their letters
    "mmbench": Bench("mmbench", _llava_text, 1024, answer_fields=lambda q: {
        "prompt": q["prompt"], "round_id": 0, "options": q["options"],
        "option_char": list(option_letters(len(q["options"])))}),
    # MMMU's run: do_sample with 5 beams at temperature 1 (beam sampling), 128 new tokens
    "mmmu": Bench("mmmu", _llava_text, 128, temperature=1.0, num_beams=5, preset=_mmmu_preset),
    "mathvista": Bench("mathvista", _llava_text, 1024,  # the answers are in the problems
                       has_answer=lambda q: q["problem"].get("answer") not in (None, "")),
}

# How each benchmark's --data is read: question records with question_id, text and the image(s).
READERS = {"mmbench": read_mmbench, "scienceqa": read_scienceqa, "mmmu": read_mmmu, "mathvista": read_mathvista}
