"""Batch evaluation: the runner on tiny benchmark samples made here (synthetic questions, generated
images) in the LLaVA formats, resuming, bad input; the POPE and MME scorers against hand-computed scores."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from helpers import GOLDEN, golden_model
from mgjax.cli import main
from mgjax.errors import MGJaxError
from mgjax.eval.scores import mme_scores, pope_scores

CASE = GOLDEN / "llama_vicuna"
SHORT = "Answer the question using a single word or phrase."


def _pope_sample(root):
    """Two COCO-like images and six POPE questions (two per category) with their label files."""
    (root / "images").mkdir()
    for i, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.new("RGB", (64 + 16 * i, 48), colour).save(root / "images" / f"COCO_{i}.jpg")
    questions, labels = [], {}
    for n, cat in enumerate(("adversarial", "popular", "random")):
        for k in range(2):
            qid = 10 * n + k
            q = {"question_id": qid, "image": f"COCO_{k}.jpg", "text": f"Is there a {cat} object in the image?",
                 "category": cat}
            questions.append({**q, "text": q["text"] + f"\n{SHORT}"})
            labels.setdefault(cat, []).append({**q, "label": "yes" if k == 0 else "no"})
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "labels").mkdir()
    for cat, rows in labels.items():
        (root / "labels" / f"coco_pope_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions


def test_pope_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    """`mgjax eval pope`: LLaVA answer lines, each the answer its question gets alone, in batches of 4 (the
    last one short); scores written; an answer file cut mid-line resumes without asking again."""
    questions = _pope_sample(tmp_path)
    monkeypatch.chdir(CASE)
    out = tmp_path / "answers.jsonl"
    args = ["eval", "pope", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "q.jsonl"), "--images",
            str(tmp_path / "images"), "--out", str(out), "--batch-size", "4", "--annotations", str(tmp_path / "labels")]
    assert main(args) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert set(answers[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    model = golden_model()
    for q, a in zip(questions[:2], answers[:2]):
        ids, im, aux = model.prompt_inputs(q["text"], [tmp_path / "images" / q["image"]])
        assert a["text"] == model.generate([ids], im, aux, max_new_tokens=128).text[0]
    scores = json.loads((tmp_path / "answers.jsonl.scores.json").read_text())
    assert set(scores) == {"adversarial", "popular", "random"} and scores["random"]["questions"] == 2
    # A kill mid-write: two whole lines and half a third. The re-run keeps the two, asks the other four.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])
    assert main(args) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in again] == [q["question_id"] for q in questions]
    assert [a["answer_id"] for a in again[:2]] == [a["answer_id"] for a in answers[:2]]
    assert [a["text"] for a in again] == [a["text"] for a in answers]


def test_eval_bad_input(tmp_path, monkeypatch, capsys):
    questions = _pope_sample(tmp_path)
    monkeypatch.chdir(CASE)
    base = ["eval", "pope", "--ckpt", "MGM-7B-tiny", "--images", str(tmp_path / "images"), "--out",
            str(tmp_path / "a.jsonl")]
    (tmp_path / "missing.jsonl").write_text(json.dumps({**questions[0], "image": "nope.jpg"}) + "\n")
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    (tmp_path / "noid.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    assert main([*base, "--data", str(tmp_path / "noid.jsonl")]) == 2
    assert "record 1 has no question_id" in capsys.readouterr().err
    (tmp_path / "cut.jsonl").write_text(json.dumps(questions[0])[:-5] + "\n")
    assert main([*base, "--data", str(tmp_path / "cut.jsonl")]) == 2
    assert "not Parquet, JSON or JSONL" in capsys.readouterr().err
    assert main(["eval", "pope", "--ckpt", "MGM-7B-tiny"]) == 2
    assert "--data" in capsys.readouterr().err


def test_pope_scores_by_hand(tmp_path):
    """LLaVA's rule: the first sentence, commas dropped; 'No' / 'not' / 'no' as a word means no."""
    texts = ["Yes, there is one.", "No.", "There is not.", "yes", "The answer: no, none", "Yes. But no."]
    truth = [True, True, False, False, False, True]  # predictions: yes, no, no, yes, no, yes
    questions = [{"question_id": i, "category": "random"} for i in range(6)]
    (tmp_path / "coco_pope_random.json").write_text(
        "".join(json.dumps({"question_id": i, "label": "yes" if t else "no"}) + "\n" for i, t in enumerate(truth)))
    s = pope_scores([{"question_id": i, "text": t} for i, t in enumerate(texts)], questions, tmp_path)["random"]
    # TP 2 (0, 5), FN 1 (1), TN 2 (2, 4), FP 1 (3)
    assert s["accuracy"] == pytest.approx(4 / 6) and s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 6)


def test_mme_scores_by_hand(tmp_path):
    """acc and acc+ per category from MME's release layout (a folder with images/ + questions_answers_YN/,
    a flat one), LLaVA's prompt conversion (the release's double space before 'Please' included)."""
    art = tmp_path / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    (art / "questions_answers_YN" / "1.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n")
    (art / "questions_answers_YN" / "2.txt").write_text(
        "Is this a sculpture?  Please answer yes or no.\tNo\nIs this a painting?  Please answer yes or no.\tYes\n")
    code = tmp_path / "code_reasoning"
    code.mkdir()
    (code / "7.txt").write_text("Does it print 3? Please answer yes or no.\tYes\nDoes it print 4? Please answer "
                                "yes or no.\tNo\n")
    def ans(qid, question, text):
        return {"question_id": qid, "prompt": f"{question}\n{SHORT}", "text": text}

    answers = [ans("artwork/1.jpg", "Is this by Monet?", "Yes"),
               ans("artwork/1.jpg", "Is this by Dali?", "no"),
               ans("artwork/2.jpg", "Is this a sculpture?", "Yes, it is"),
               ans("artwork/2.jpg", "Is this a painting?", "yes"),
               ans("code_reasoning/7.png", "Does it print 3?", "Nope"),
               ans("code_reasoning/7.png", "Does it print 4?", "no")]
    s = mme_scores(answers, tmp_path)
    # artwork: 3 of 4 right (the sculpture answer is wrong), 1 of 2 images both right: 75 + 50
    assert s["artwork"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    # code: "Nope" reads as no (first four characters), wrong; "no" right: 50 + 0
    assert s["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert s["perception"] == 125.0 and s["cognition"] == 50.0
    with pytest.raises(MGJaxError, match="no ground truth"):
        mme_scores([ans("artwork/1.jpg", "Unknown?", "yes")], tmp_path)


def test_mme_and_mmvet_end_to_end(tmp_path, monkeypatch):
    """`mgjax eval mme` on a tiny MME release (LLaVA's question file: question_id category/image, the
    instruction appended): answered, scored per category; `mgjax eval mmvet` writes the grader's file."""
    release = tmp_path / "MME"
    (release / "artwork" / "images").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN").mkdir()
    Image.new("RGB", (40, 40), (90, 60, 30)).save(release / "artwork" / "images" / "1.jpg")
    asked = ["Is this by Monet? Please answer yes or no.", "Is this by Dali? Please answer yes or no."]
    (release / "artwork" / "questions_answers_YN" / "1.txt").write_text(f"{asked[0]}\tYes\n{asked[1]}\tNo\n")
    questions = [{"question_id": "artwork/1.jpg", "image": "artwork/images/1.jpg", "text": f"{q}\n{SHORT}",
                  "category": "artwork"} for q in asked]
    (tmp_path / "mme.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    monkeypatch.chdir(CASE)
    out = tmp_path / "mme_answers.jsonl"
    assert main(["eval", "mme", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "mme.jsonl"), "--images",
                 str(release), "--out", str(out), "--annotations", str(release), "--max-new-tokens", "2"]) == 0
    assert [a["prompt"] for a in map(json.loads, out.read_text().splitlines())] == [q["text"] for q in questions]
    art = json.loads((tmp_path / "mme_answers.jsonl.scores.json").read_text())["artwork"]
    assert art["acc"] in (0.0, 50.0, 100.0) and art["acc_plus"] == (100.0 if art["acc"] == 100.0 else 0.0)
    assert art["score"] == art["acc"] + art["acc_plus"]
    mmvet = [{"question_id": i, "image": "artwork/images/1.jpg", "text": q} for i, q in enumerate(asked)]
    (tmp_path / "mmvet.jsonl").write_text("".join(json.dumps(q) + "\n" for q in mmvet))
    out = tmp_path / "mmvet_answers.jsonl"
    assert main(["eval", "mmvet", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "mmvet.jsonl"), "--images",
                 str(release), "--out", str(out), "--max-new-tokens", "2"]) == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert json.loads((tmp_path / "mmvet_answers.jsonl.mmvet.json").read_text()) == {"v1_0": texts[0], "v1_1": texts[1]}


def test_mmvet_grader_file(tmp_path):
    from mgjax.eval.scores import mmvet_submission

    answers = [{"question_id": 3, "text": "a cat"}, {"question_id": "v2", "text": ""}]
    path = mmvet_submission(answers, tmp_path / "m.json")
    assert json.loads(path.read_text()) == {"v1_3": "a cat", "v1_v2": ""}


def test_hosts_split_the_questions_and_host_0_merges(tmp_path, monkeypatch):
    """Two hosts (run one after the other here): disjoint shares in part files, merged in question order;
    a missing answer is an error, not a short file."""
    from mgjax.eval.benchmarks import BENCHES
    from mgjax.eval.runner import merge_parts, part_path, read_questions, run

    questions = _pope_sample(tmp_path)
    monkeypatch.chdir(CASE)
    model = golden_model()
    out = tmp_path / "answers.jsonl"
    qs = read_questions(tmp_path / "q.jsonl")
    for host in (0, 1):
        run(model, BENCHES["pope"], qs, tmp_path / "images", out, batch_size=4, process_index=host, process_count=2)
    shares = [[json.loads(line)["question_id"] for line in part_path(out, h, 2).read_text().splitlines()]
              for h in (0, 1)]
    assert shares == [[q["question_id"] for q in questions[0::2]], [q["question_id"] for q in questions[1::2]]]
    lost = part_path(out, 1, 2).read_text().splitlines()
    part_path(out, 1, 2).write_text("\n".join(lost[:-1]) + "\n")
    with pytest.raises(MGJaxError, match="no answer"):
        merge_parts(qs, out, 2)
    part_path(out, 1, 2).write_text("\n".join(lost) + "\n")
    merge_parts(qs, out, 2)
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == \
        [q["question_id"] for q in questions]
    assert not part_path(out, 0, 2).exists()


def _mmbench_sample(path):
    """Two MMBench questions with a circular variant each (index + 1e6, options shifted): a hint and four
    options (answer C), three options and no hint (answer A)."""
    import base64
    import io

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    head = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
    rows = [["7", "What colour is it?", "Look closely.", "red", "green", "blue", "grey", "C", "colour",
             png("blue"), "s"],
            ["1000007", "What colour is it?", "Look closely.", "green", "blue", "grey", "red", "B", "colour",
             png("blue"), "s"],
            ["9", "Which shape?", "nan", "square", "circle", "line", "nan", "A", "shape", png("red"), "s"],
            ["1000009", "Which shape?", "nan", "circle", "line", "square", "nan", "C", "shape", png("red"), "s"]]
    path.write_text("".join("\t".join(r) + "\n" for r in [head, *rows]))


def test_mmbench_prompt_circular_score_and_sheet(tmp_path, monkeypatch):
    """The paper's prompt per TSV row; a question counts only when all its circular variants (index modulo
    1e6) are right; the prediction sheet has LLaVA's columns."""
    from mgjax.eval.benchmarks import read_mmbench
    from mgjax.eval.scores import mmbench_letter, mmbench_scores

    _mmbench_sample(tmp_path / "dev.tsv")
    qs = read_mmbench(tmp_path / "dev.tsv")
    assert [q["question_id"] for q in qs] == [7, 1000007, 9, 1000009]
    assert qs[0]["text"] == ("Look closely.\nWhat colour is it?\nA. red\nB. green\nC. blue\nD. grey\n"
                             "Answer with the option's letter from the given choices directly.")
    assert qs[2]["text"].startswith("Which shape?\nA. square\nB. circle\nC. line\nAnswer") and qs[2]["options"] == \
        ["square", "circle", "line"]
    # eval_mmbench.py's can_infer: any of A-E whatever the options ("D" of three), an option's text inside
    assert [mmbench_letter(t, {"A": "x", "B": "y", "C": "z"}) for t in ("B", "C.", "A) x", "y", "Because", "D")] == \
        ["B", "C", "A", "B", None, "D"]
    answers = [{"question_id": q["question_id"], "text": q["answer"]} for q in qs]
    answers[3]["text"] = "A"  # one variant of question 9 wrong: question 9 does not count
    s = mmbench_scores(answers, qs)
    assert s["circular_accuracy"] == 50.0 and s["per_category"] == {"colour": 100.0, "shape": 0.0}

    monkeypatch.chdir(CASE)
    out = tmp_path / "mmbench.jsonl"
    assert main(["eval", "mmbench", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "dev.tsv"), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "8"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in lines] == [7, 1000007, 9, 1000009]
    assert lines[0]["prompt"] == qs[0]["prompt"] and lines[2]["option_char"] == ["A", "B", "C"]
    with open(tmp_path / "mmbench.jsonl.submission.tsv", newline="") as f:
        sheet = list(csv.reader(f, delimiter="\t"))
    assert sheet[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer"]
    assert [r[0] for r in sheet[1:]] == ["7", "1000007", "9", "1000009"]
    assert [r[6] for r in sheet[1:]] == [a["text"] for a in lines]
    assert "circular_accuracy" in json.loads((tmp_path / "mmbench.jsonl.scores.json").read_text())


def test_scienceqa_file_parsing_and_score(tmp_path, monkeypatch):
    """LLaVA's ScienceQA file (an IMG question, a text-only one) answered end to end with the letter
    prompt; the scorer's parsing and the IMG accuracy against hand-computed values."""
    from mgjax.eval.benchmarks import read_scienceqa
    from mgjax.eval.scores import scienceqa_letter, scienceqa_scores

    (tmp_path / "images" / "1").mkdir(parents=True)
    Image.new("RGB", (50, 40), (0, 120, 0)).save(tmp_path / "images" / "1" / "image.png")
    leaf = "Context: A leaf.\nQuestion: What colour?\nOptions: (A) red (B) green"
    rows = [{"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": f"{leaf}\n<image>"},
                                                                   {"from": "gpt", "value": "The answer is B."}]},
            {"id": "2", "conversations": [{"from": "human", "value": "Question: 2+2?\nOptions: (A) 3 (B) 4 (C) 5"},
                                          {"from": "gpt", "value": "The answer is B."}]}]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    problems = {"1": {"choices": ["red", "green"], "answer": 1, "image": "image.png"},
                "2": {"choices": ["3", "4", "5"], "answer": 1, "image": None},
                "3": {"choices": ["x", "y"], "answer": 0, "image": "image.png"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    qs = read_scienceqa(tmp_path / "q.json")
    assert qs[0] == {"question_id": "1", "image": "1/image.png", "text": leaf}
    assert "image" not in qs[1]
    assert [scienceqa_letter(t) for t in ("B", "C. 5", "The answer is A.", "A or B", "B is it")] == \
        ["B", "C", "A", None, None]
    # the IMG subset: the answers whose prompt holds model_vqa_science's "<image>"
    s = scienceqa_scores([{"question_id": "1", "prompt": "<image>\nleaf", "text": "B"},
                          {"question_id": "2", "prompt": "sum", "text": "C. 5"},
                          {"question_id": "3", "prompt": "<image>\nxy", "text": "The answer is A."}],
                         tmp_path / "problems.json")
    assert s == {"accuracy": pytest.approx(200 / 3), "img_accuracy": 100.0, "questions": 3, "img_questions": 2}

    monkeypatch.chdir(CASE)
    out = tmp_path / "sqa.jsonl"
    assert main(["eval", "scienceqa", "--ckpt", "MGM-7B-tiny", "--data", str(tmp_path / "q.json"), "--images",
                 str(tmp_path / "images"), "--out", str(out), "--annotations", str(tmp_path / "problems.json"),
                 "--max-new-tokens", "3"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    # model_vqa_science's answer prompt: "<image>\n" before an image question, the instruction after
    assert answers[0]["prompt"] == f"<image>\n{leaf}\nAnswer with the option's letter from the given choices directly."
    assert answers[1]["prompt"].startswith("Question: 2+2?")
    assert json.loads((tmp_path / "sqa.jsonl.scores.json").read_text())["questions"] == 2
