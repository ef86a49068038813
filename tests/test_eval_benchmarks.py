"""TextVQA, MMMU and MathVista: prompts built from each benchmark's own file formats (tiny synthetic samples,
generated images), the runner end to end, and the scorers' rules against hand-computed values."""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import GOLDEN
from mgjax.cli import main
from mgjax.errors import MGJaxError
from mgjax.eval import scores as sc
from mgjax.eval.benchmarks import MMMU_NO_IMAGE, mathvista_query, read_mathvista, read_mmmu

CASE = GOLDEN / "llama_vicuna"
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def _png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- TextVQA

def test_vqa_normalisation_and_accuracy_by_hand():
    norm = sc.vqa_normalize
    assert norm("The Two Dogs.") == "2 dogs"  # article dropped, number word, final period
    assert norm("coca-cola") == "coca cola" and norm("x - y") == "x y"  # a joining '-' is a space, a free one goes
    assert norm("3.5") == "3.5" and norm("12,000") == "12000" and norm("dont") == "don't"
    assert norm("It's\tred!") == "it 's red" and norm("yes?") == "yes"
    stop = ["stop", "Stop.", "STOP"] + ["go"] * 6 + ["a stop"]  # four normalise to "stop"
    assert sc.vqa_accuracy("stop", stop) == 1.0  # any nine hold >= 3
    three = ["stop", "Stop.", "STOP"] + ["go"] * 7
    assert sc.vqa_accuracy("Stop", three) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert sc.vqa_accuracy("go", ["go"] + ["x"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert sc.vqa_accuracy("nothing", three) == 0.0


def _textvqa_sample(root):
    """LLaVA's TextVQA format: question_id is the image id, shared by the two questions on image "abc"."""
    (root / "images").mkdir()
    for name, colour in (("abc", (200, 0, 0)), ("def", (0, 0, 200))):
        Image.new("RGB", (48, 40), colour).save(root / "images" / f"{name}.jpg")
    asked = [("abc", "What is written?", "STOP, sign"), ("abc", "What colour is the sign?", "STOP, sign"),
             ("def", "Which brand?", "acme")]
    questions = [{"question_id": i, "image": f"{i}.jpg", "text": f"{q}\nReference OCR token: {ocr}\n{SHORT}"}
                 for i, q, ocr in asked]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = [["stop"] * 10, ["red"] * 3 + ["white"] * 7, ["acme"] * 10]
    (root / "ann.json").write_text(json.dumps({"data": [
        {"image_id": i, "question": q, "answers": a} for (i, q, _), a in zip(asked, answers)]}))
    return questions


def test_textvqa_scores_by_hand(tmp_path):
    _textvqa_sample(tmp_path)
    prompts = [json.loads(line)["text"] for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    answers = [{"question_id": "abc", "prompt": prompts[0], "text": "Stop"},  # 1.0
               {"question_id": "abc", "prompt": prompts[1], "text": "red"},  # 3 of 10: (3 * 2/3 + 7) / 10
               {"question_id": "def", "prompt": prompts[2], "text": "ACME inc"}]  # 0
    s = sc.textvqa_scores(answers, tmp_path / "ann.json")
    assert s["questions"] == 3 and s["accuracy"] == pytest.approx(100 * (1 + 0.9 + 0) / 3)
    assert sc.textvqa_question("Reference OCR token: a\nWhat is it?\nAnswer") == "what is it?"
    with pytest.raises(MGJaxError, match="no annotation"):
        sc.textvqa_scores([{**answers[0], "question_id": "zzz"}], tmp_path / "ann.json")


def test_textvqa_end_to_end_with_shared_ids_and_resume(tmp_path, monkeypatch):
    """Two questions share an id (LLaVA's TextVQA file): both answered, in order, also after a kill that
    left only the first answer; the scores file is written."""
    questions = _textvqa_sample(tmp_path)
    monkeypatch.chdir(CASE)
    out = tmp_path / "tv.jsonl"
    args = ["eval", "textvqa", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "q.jsonl"), "--images",
            str(tmp_path / "images"), "--out", str(out), "--annotations", str(tmp_path / "ann.json"),
            "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(args) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(a["question_id"], a["prompt"]) for a in first] == [(q["question_id"], q["text"]) for q in questions]
    assert json.loads((tmp_path / "tv.jsonl.scores.json").read_text())["questions"] == 3
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    assert main(args) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["prompt"] for a in again] == [q["text"] for q in questions]
    assert again[0]["answer_id"] == first[0]["answer_id"] and [a["text"] for a in again] == [a["text"] for a in first]


# ------------------------------------------------------------------------------------------------- MMMU

def _mmmu_rows(subject, n0, with_image=True):
    """A multiple-choice and an open question of one subject, as MMMU's Parquet holds them."""
    def image(colour):
        return {"bytes": _png(colour), "path": "x.png"} if with_image else None

    return [{"id": f"validation_{subject}_{n0}", "question": "<image 1> What colour is it?",
             "options": "['red', 'green', 'blue']", "answer": "C", "question_type": "multiple-choice",
             "image_1": image("blue")},
            {"id": f"validation_{subject}_{n0 + 1}", "question": "How many sides has <image 1>?", "options": "[]",
             "answer": "4", "question_type": "open", "image_1": image("red")}]


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_mmmu_prompts_parsing_and_scores_by_hand(tmp_path):
    _write_parquet(tmp_path / "Art" / "validation-0.parquet", _mmmu_rows("Art", 1))
    qs = read_mmmu(tmp_path / "Art" / "validation-0.parquet")
    # MMMU's llava1.5 config: "{}\n{}\n..." (YAML folds its blank lines) around options that end in "\n"
    assert qs[0]["text"] == f"<image 1> What colour is it?\n(A) red\n(B) green\n(C) blue\n\n{LETTER}"
    assert qs[1]["text"] == f"How many sides has <image 1>?\n{SHORT}"
    assert qs[0]["subject"] == "Art" and qs[0]["letters"] == ["A", "B", "C"] and qs[1]["letters"] == []
    letters, options = ["A", "B", "C", "D"], ["red", "green", "blue", "grey"]

    def choice(text):
        return sc.mmmu_choice(text, letters, options, random.Random(0))

    assert choice("(B)") == "B" and choice("The answer is C.") == "C" and choice("A or B") == "B"
    assert choice("(A) is wrong, so (D)") == "D"  # brackets win; the last one mentioned
    assert choice("I am quite sure that the colour is green") == "B"  # > 5 words: option text
    assert choice("green") == random.Random(0).choice(letters)  # <= 5 words, no letter: MMMU draws one
    assert sc.mmmu_open_right("The answer is 3.14159", "3.14")  # rounded to 2 places
    assert sc.mmmu_open_right("so there are 1,000 apples", "1000")
    assert sc.mmmu_open_right("It is Paris.", ["paris", "Paris, France"])
    assert not sc.mmmu_open_right("It is Rome.", "paris")
    assert not sc.mmmu_open_right("4 sides\nthe total is 8", "4")  # the key of each sentence, not every number
    questions = [{"question_id": f"validation_{s}_{i}", "subject": s, "letters": ["A", "B"], "options": ["x", "y"],
                  "answer": "A"} for s, i in (("Art", 1), ("Art", 2), ("Math", 1), ("Physics", 1))]
    s = sc.mmmu_scores({"validation_Art_1": "A", "validation_Art_2": "B", "validation_Math_1": "A",
                        "validation_Physics_1": "B"}, questions)
    assert s["subjects"]["Art"] == {"accuracy": 50.0, "questions": 2}
    assert s["categories"] == {"Art and Design": {"accuracy": 50.0, "questions": 2},
                               "Science": {"accuracy": 50.0, "questions": 2}}
    assert s["overall"] == {"accuracy": 50.0, "questions": 4}


def test_mmmu_end_to_end_from_parquet(tmp_path, monkeypatch):
    """MMMU's per-subject Parquet files through a glob, 5-beam sampling; a question without image_1 gets
    the original's answer without the model; the predictions file holds letters for multiple-choice."""
    _write_parquet(tmp_path / "MMMU" / "Art" / "validation-00000-of-00001.parquet", _mmmu_rows("Art", 1))
    _write_parquet(tmp_path / "MMMU" / "Math" / "validation-00000-of-00001.parquet",
                   _mmmu_rows("Math", 1, with_image=False))
    _write_parquet(tmp_path / "MMMU" / "Math" / "dev-00000-of-00001.parquet", _mmmu_rows("Math", 9))
    monkeypatch.chdir(CASE)
    out = tmp_path / "mmmu.jsonl"
    assert main(["eval", "mmmu", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "MMMU" / "*" / "validation-*"),
                 "--out", str(out), "--max-new-tokens", "3", "--batch-size", "4"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    ids = ["validation_Art_1", "validation_Art_2", "validation_Math_1", "validation_Math_2"]
    assert [a["question_id"] for a in answers] == ids
    # Math has no image_1: a seeded random letter, the original's fixed text for the open question
    assert [a["text"] for a in answers[2:]] == [random.Random("validation_Math_1").choice("ABC"), MMMU_NO_IMAGE]
    predictions = json.loads((tmp_path / "mmmu.jsonl.mmmu.json").read_text())
    assert list(predictions) == ids and predictions["validation_Art_2"] == answers[1]["text"]
    assert predictions["validation_Art_1"] in ("A", "B", "C")
    scores = json.loads((tmp_path / "mmmu.jsonl.scores.json").read_text())
    assert scores["overall"]["questions"] == 4 and set(scores["subjects"]) == {"Art", "Math"}


# -------------------------------------------------------------------------------------------- MathVista

def _problem(pid, qtype, atype, answer, choices=None, precision=None, unit=None, **meta):
    return {"pid": pid, "question": f"Question {pid}?", "image": f"images/{pid}.png", "choices": choices,
            "unit": unit, "precision": precision, "answer": answer, "question_type": qtype, "answer_type": atype,
            "metadata": {"task": "figure question answering", "skills": ["arithmetic reasoning"], **meta}}


def test_mathvista_query_extraction_and_scores_by_hand():
    mc = _problem("1", "multi_choice", "text", "45°", choices=["30°", "45°", "60°"])
    assert mathvista_query(mc) == (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
        "Question: Question 1?\nChoices:\n(A) 30°\n(B) 45°\n(C) 60°")
    fl = _problem("2", "free_form", "float", "1.5", precision=1.0, unit="cm")
    assert mathvista_query(fl).endswith("at the end.\nQuestion: Question 2? (Unit: cm)")
    integer = _problem("3", "free_form", "integer", "7")

    def right(text, problem):
        return sc.mathvista_normalize(sc.mathvista_extract(text, problem), problem) == problem["answer"]

    assert right("B", mc) and right("(B) 45°", mc) and right("The answer is B.", mc) and right("45°", mc)
    assert right("It measures 45 degrees", mc)  # no letter, no choice text: the most similar choice
    assert not right("C", mc)
    assert right("1.50", fl) and right("The length is 1.5 cm.", fl) and not right("2", fl)
    assert right("7", integer) and right("There are 7.0 birds", integer) and not right("seven", integer)
    assert right('The answer is "7".', integer)
    questions = [{"question_id": p["pid"], "problem": p} for p in (mc, fl, integer)]
    s = sc.mathvista_scores([{"question_id": "1", "text": "B"}, {"question_id": "2", "text": "3"},
                             {"question_id": "3", "text": "7"}], questions)
    assert s["accuracy"] == pytest.approx(200 / 3) and s["questions"] == 3
    assert s["by"]["question_type"] == {"free_form": {"accuracy": 50.0, "questions": 2},
                                        "multi_choice": {"accuracy": 100.0, "questions": 1}}
    assert s["by"]["skills"]["arithmetic reasoning"]["questions"] == 3


def test_mathvista_end_to_end_from_testmini_json(tmp_path, monkeypatch):
    """testmini.json ({pid: problem} with image paths; one problem carries its own `query`): answered with
    the query, scored, and the file MathVista's extraction reads is written."""
    (tmp_path / "images").mkdir()
    problems = {"1": _problem("1", "multi_choice", "text", "45°", choices=["30°", "45°"]),
                "2": {**_problem("2", "free_form", "integer", "7"), "query": "Hint: own query\nQuestion: 2?"}}
    for pid in problems:
        Image.new("RGB", (30, 30), (10, 200, 10)).save(tmp_path / "images" / f"{pid}.png")
    (tmp_path / "testmini.json").write_text(json.dumps(problems))
    qs = read_mathvista(tmp_path / "testmini.json")
    assert qs[0]["text"] == mathvista_query(problems["1"]) and qs[1]["text"] == "Hint: own query\nQuestion: 2?"
    monkeypatch.chdir(CASE)
    out = tmp_path / "mv.jsonl"
    base = ["eval", "mathvista", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "testmini.json"), "--out",
            str(out), "--max-new-tokens", "3"]
    assert main(base) == 2  # the problems name image files: --images is needed
    assert main([*base, "--images", str(tmp_path)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["1", "2"]
    output = json.loads((tmp_path / "mv.jsonl.mathvista.json").read_text())
    assert output["2"]["response"] == answers[1]["text"] and output["2"]["answer"] == "7"
    assert json.loads((tmp_path / "mv.jsonl.scores.json").read_text())["questions"] == 2
