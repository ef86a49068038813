"""Local scorers for the deterministic metrics, as the official scripts compute them (LLaVA's
`eval_pope.py`; MME's `calculation.py` after LLaVA's `convert_answer_to_mme.py`)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from mgjax.errors import MGJaxError

POPE_CATEGORIES = ("adversarial", "popular", "random")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def read_answers(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pope_yes(text: str) -> bool:
    """LLaVA's POPE parsing: the first sentence, commas dropped; 'No', 'not' or 'no' as a word is a no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def pope_scores(answers: list[dict], questions: list[dict], label_dir: str | os.PathLike) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio per POPE category, from the official label files
    `coco_pope_{category}.json` (JSONL with question_id and label yes/no). Questions carry `category`."""
    category = {q["question_id"]: q.get("category") for q in questions}
    out = {}
    for cat in POPE_CATEGORIES:
        f = Path(label_dir) / f"coco_pope_{cat}.json"
        if not f.is_file():
            continue
        labels = {r["question_id"]: r["label"] == "yes" for r in map(json.loads, f.read_text().splitlines())
                  if r}
        pairs = [(pope_yes(a["text"]), labels[a["question_id"]]) for a in answers
                 if category.get(a["question_id"]) == cat and a["question_id"] in labels]
        if not pairs:
            continue
        tp = sum(p and t for p, t in pairs)
        fp = sum(p and not t for p, t in pairs)
        tn = sum(not p and not t for p, t in pairs)
        fn = sum(not p and t for p, t in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out[cat] = {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall,
                    "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                    "yes_ratio": (tp + fp) / len(pairs), "questions": len(pairs)}
    if not out:
        raise MGJaxError(f"{label_dir}: no coco_pope_{{adversarial,popular,random}}.json label file matched the "
                         "answers (questions need a 'category')")
    return out


def mme_ground_truth(release: str | os.PathLike) -> dict:
    """{(category, file.txt, question): answer} from MME_Benchmark_release_version: per category folder,
    `questions_answers_YN/*.txt` (or the .txt files beside the images), lines `question<TAB>answer`."""
    gt = {}
    release = Path(release)
    for cat_dir in sorted(p for p in release.iterdir() if p.is_dir()):
        qa = cat_dir / "questions_answers_YN" if (cat_dir / "images").is_dir() else cat_dir
        for f in qa.glob("*.txt"):
            for line in f.read_text().splitlines():
                if line.strip():
                    question, answer = line.strip().split("\t")
                    gt[(cat_dir.name, f.name, question)] = answer
    if not gt:
        raise MGJaxError(f"{release}: no MME question files (category folders with question<TAB>answer .txt)")
    return gt


def _mme_pred(text: str) -> str:
    """MME's parse_pred_ans: yes / no, or what the first four characters say, else other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_scores(answers: list[dict], release: str | os.PathLike) -> dict:
    """Per category: acc (questions right, %), acc+ (images with both questions right, %) and score
    = acc + acc+; perception and cognition totals. Answers' question_id is `category/image.ext`."""
    gt = mme_ground_truth(release)
    per = defaultdict(lambda: defaultdict(list))  # category -> image file -> [right, ...]
    for a in answers:
        category, image = a["question_id"].split("/")[0], a["question_id"].split("/")[-1]
        file = image.rsplit(".", 1)[0] + ".txt"
        prompt = a["prompt"].replace("Answer the question using a single word or phrase.", "").strip()
        if "Please answer yes or no." not in prompt:  # LLaVA's conversion, the release's double space included
            prompt += " Please answer yes or no."
            if (category, file, prompt) not in gt:
                prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        key = (category, file, prompt)
        if key not in gt:
            raise MGJaxError(f"MME: no ground truth for {a['question_id']!r} / {prompt!r} under {release}")
        per[category][file].append(_mme_pred(a["text"]) == gt[key].lower())
    out = {}
    for category, images in per.items():
        flat = [r for rs in images.values() for r in rs]
        acc = 100 * sum(flat) / len(flat)
        acc_plus = 100 * sum(all(rs) for rs in images.values()) / len(images)
        out[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    out["perception"] = sum(out[c]["score"] for c in MME_PERCEPTION if c in out)
    out["cognition"] = sum(out[c]["score"] for c in MME_COGNITION if c in out)
    return out


def mmvet_submission(answers: list[dict], path: str | os.PathLike) -> Path:
    """The MM-Vet grader's input: {"v1_<question_id>": answer} (LLaVA's `convert_mmvet_for_eval.py`)."""
    path = Path(path)
    path.write_text(json.dumps({f"v1_{a['question_id']}": a["text"] for a in answers}, indent=2))
    return path


def mmbench_letter(text: str, options: list[str]) -> str | None:
    """The option an answer picks: a leading option letter ("B", "B.", "B) ..."), or the text of an option;
    None when it picks none."""
    letters = "ABCD"[:len(options)]
    t = text.strip()
    if t and t[0] in letters and (len(t) == 1 or not t[1].isalnum()):
        return t[0]
    return next((c for c, o in zip(letters, options) if t.lower() == o.strip().lower()), None)


CIRCULAR = 1_000_000  # MMBench numbers a question's circular variants index + k * CIRCULAR


def mmbench_scores(answers: list[dict], questions: list[dict]) -> dict:
    """Circular accuracy in % (a question counts when all its variants, index modulo 1e6, are answered
    right), overall and per category, on a split with answers (dev)."""
    truth = {q["question_id"]: q for q in questions}
    right: dict[int, list[bool]] = defaultdict(list)
    category: dict[int, str] = {}
    for a in answers:
        q = truth[a["question_id"]]
        if q.get("answer") is None:
            raise MGJaxError("MMBench: the questions have no answers (the test split): submit the sheet instead")
        main = int(q["question_id"]) % CIRCULAR
        right[main].append(mmbench_letter(a["text"], q["options"]) == q["answer"])
        category[main] = q.get("category") or "-"
    by_category: dict[str, list[bool]] = defaultdict(list)
    for main, rs in right.items():
        by_category[category[main]].append(all(rs))
    ok = [all(rs) for rs in right.values()]
    return {"circular_accuracy": 100 * sum(ok) / len(ok), "questions": len(ok),
            "per_category": {c: 100 * sum(v) / len(v) for c, v in sorted(by_category.items())}}


def mmbench_submission(answers: list[dict], questions: list[dict], path: str | os.PathLike) -> Path:
    """The prediction sheet of LLaVA's `convert_mmbench_for_submission.py`: the TSV's rows without hint,
    category, source, image, comment and l2-category, a `prediction` column as the 7th. Written as TSV
    (save it as .xlsx for the MMBench server: openpyxl is not a dependency)."""
    import csv

    text = {a["question_id"]: a["text"] for a in answers}
    dropped = {"hint", "category", "source", "image", "comment", "l2-category"}
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        for n, q in enumerate(questions):
            cells = [(k, v) for k, v in q["row"].items() if k not in dropped]
            cells.insert(6, ("prediction", text.get(q["question_id"], "")))
            if n == 0:
                w.writerow([k for k, _ in cells])
            w.writerow([v for _, v in cells])
    return path


def scienceqa_letter(text: str, letters: str) -> str | None:
    """LLaVA's `eval_science_qa.py` parsing: the text is a letter, or starts "X. ", or holds exactly one
    "The answer is X."; else None (FAILED)."""
    import re

    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


def scienceqa_scores(answers: list[dict], problems_file: str | os.PathLike) -> dict:
    """Accuracy (%) over all answered questions and over those with an image (ScienceQA-IMG, the paper's
    number), from ScienceQA's `problems.json` (choices, answer index, image)."""
    try:
        problems = json.loads(Path(problems_file).read_text())
    except (OSError, ValueError) as e:
        raise MGJaxError(f"{problems_file}: not ScienceQA's problems.json ({e})") from None
    right, right_img = [], []
    for a in answers:
        p = problems.get(str(a["question_id"]))
        if p is None:
            raise MGJaxError(f"ScienceQA: question {a['question_id']!r} is not in {problems_file}")
        letters = "ABCDE"[:len(p["choices"])]
        ok = scienceqa_letter(a["text"], letters) == letters[p["answer"]]
        right.append(ok)
        if p.get("image"):
            right_img.append(ok)
    return {"accuracy": 100 * sum(right) / len(right), "img_accuracy": 100 * sum(right_img) / max(len(right_img), 1),
            "questions": len(right), "img_questions": len(right_img)}
