"""Local scorers for the deterministic metrics, as the official scripts compute them (LLaVA's
`eval_pope.py`; MME's `calculation.py` after LLaVA's `convert_answer_to_mme.py`)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path

from mgjax.errors import MGJaxError

POPE_CATEGORIES = ("adversarial", "popular", "random")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def option_letters(n: int) -> str:
    """The letters of `n` options: "ABCD" for 4."""
    return "".join(chr(ord("A") + i) for i in range(n))


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
    letters = option_letters(len(options))  # MMBench: at most 4
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
        letters = option_letters(len(p["choices"]))  # ScienceQA: at most 5
        ok = scienceqa_letter(a["text"], letters) == letters[p["answer"]]
        right.append(ok)
        if p.get("image"):
            right_img.append(ok)
    return {"accuracy": 100 * sum(right) / len(right), "img_accuracy": 100 * sum(right_img) / max(len(right_img), 1),
            "questions": len(right), "img_questions": len(right_img)}


# TextVQA: the VQA answer normalisation of the m4c evaluator LLaVA scores with (MGM_SPEC section 10).
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# Contractions the VQA normaliser restores, each under every spelling with some apostrophes left out.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's I'd I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she'd "
    "she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we'd we're we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd "
    "you'd've you'll you're you've").split()


def _without_apostrophes(word: str) -> list[str]:
    """`word` with each non-empty subset of its apostrophes removed (couldn't've -> couldntve, ...)."""
    at = [i for i, c in enumerate(word) if c == "'"]
    out = []
    for k in range(1, len(at) + 1):
        for drop in itertools.combinations(at, k):
            out.append("".join(c for i, c in enumerate(word) if i not in drop))
    return out


_CONTRACTION_OF = {short: word for word in _CONTRACTIONS for short in _without_apostrophes(word)}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]


def vqa_normalize(answer: str) -> str:
    """An answer as the VQA / m4c evaluators compare it: lower case, ',' '?' dropped and "'s" split off,
    punctuation removed (or made a space when it separates nothing), periods not in numbers removed, number
    words as digits, articles dropped, contractions restored."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original, out = text, text
    for p in _PUNCTUATION:  # the tests look at the text before any replacement, as the reference does
        if p + " " in original or " " + p in original or re.search(r"(\d)(,)(\d)", original):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The reference passes re.UNICODE (32) where `count` goes: at most 32 periods are removed.
    out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTION_OF.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """VQA accuracy of one prediction: min(#humans who gave it / 3, 1) averaged over the 10 leave-one-out
    subsets of the (normalised) human answers."""
    gts = [vqa_normalize(a) for a in gt_answers]
    pred = vqa_normalize(prediction)
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs) if accs else 0.0


def textvqa_question(prompt: str) -> str:
    """The question of a TextVQA prompt (its first line, or the second after a leading OCR line), lower case:
    with the image id it finds the annotation, as LLaVA's `eval_textvqa.py` does."""
    lines = prompt.split("\n")
    return (lines[1] if lines[0].startswith("Reference OCR token:") and len(lines) > 1 else lines[0]).lower()


def textvqa_scores(answers: list[dict], annotation_file: str | os.PathLike) -> dict:
    """VQA accuracy (%) against TextVQA's annotation file (`TextVQA_0.5.1_val.json`: data = [{image_id,
    question, answers (10)}]); an answer's question_id is the image id, as in LLaVA's question file."""
    try:
        data = json.loads(Path(annotation_file).read_text())["data"]
        gt = {(a["image_id"], a["question"].lower()): a["answers"] for a in data}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MGJaxError(f"{annotation_file}: not TextVQA's annotation file ({type(e).__name__}: {e})") from None
    accs = []
    for a in answers:
        key = (a["question_id"], textvqa_question(a["prompt"]))
        if key not in gt:
            raise MGJaxError(f"TextVQA: no annotation for image {key[0]!r}, question {key[1]!r} in "
                             f"{annotation_file}")
        accs.append(vqa_accuracy(a["text"], gt[key]))
    return {"accuracy": 100 * sum(accs) / len(accs), "questions": len(accs)}


# MMMU: the answer parsing and accuracy of MMMU's own evaluation (`eval_utils`), as MGM's numbers use.
MMMU_CATEGORIES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}


def mmmu_choice(response: str, letters: list[str], options: list[str], rng) -> str:
    """The letter a multiple-choice response picks, by MMMU's rules: "(B)" anywhere, else " B " as a word,
    else (in a response of more than five words) an option's text; of several, the one mentioned last;
    none: a letter drawn from `rng` (a `random.Random`), as MMMU does."""
    for c in ",.!?;:'":
        response = response.strip(c)
    response = f" {response} "
    bracketed = [c for c in letters if f"({c})" in response]
    candidates = bracketed or [c for c in letters if f" {c} " in response]
    by_text = not candidates and len(response.split()) > 5
    if by_text:
        candidates = [c for c, o in zip(letters, options) if str(o).lower() in response.lower()]
    if not candidates:
        return rng.choice(letters)
    if by_text:
        where = [response.lower().rfind(str(options[letters.index(c)]).lower()) for c in candidates]
    else:
        where = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    return candidates[where.index(max(where))]


def _mmmu_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _mmmu_normalize(text: str) -> list:
    """A number rounded to 2 places, or the lower-cased string; a single character also with a space on
    either side, so that it matches only as a word."""
    text = text.strip()
    number = _mmmu_number(text)
    if number is not None:
        return [round(number, 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _numbers(text: str) -> list[str]:
    """The numbers in a text as MMMU finds them: with thousands commas, in scientific notation, plain."""
    return (re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text) + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
            + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])", text))


def mmmu_open_candidates(response: str) -> list:
    """What an open response may answer, by MMMU's rules: per sentence (split at newlines; the reference's
    split at ". " before a capital never fires, the text being lower-cased first) the shortest tail after an
    indicator ("so ", "is ", "therefore ", ... and "=" in the last), else the whole response; plus the
    numbers in them; normalised, without duplicates."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for i, sentence in enumerate(sentences):
        shortest = ""
        for ind in indicators + (["="] if i == len(sentences) - 1 else []):
            tail = sentence.split(ind)[-1].strip()
            # an empty tail is replaced by the next one found, as the reference does
            if ind in sentence and (not shortest or len(tail) < len(shortest)):
                shortest = tail
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response]
    found = keys + [n for k in keys for n in _numbers(k)]
    out = []
    for x in (y for f in found for y in _mmmu_normalize(f)):
        if x not in out:
            out.append(x)
    return out


def mmmu_open_right(response: str, gold) -> bool:
    """An open answer is right when a normalised gold answer is a number among the candidates, or a string
    inside a candidate string."""
    golds = [y for g in (gold if isinstance(gold, list) else [gold]) for y in _mmmu_normalize(str(g))]
    for pred in mmmu_open_candidates(response):
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def mmmu_predictions(answers: list[dict], questions: list[dict]) -> dict:
    """MMMU's output file: {id: the parsed letter of a multiple-choice answer, or the open response}."""
    by_id = {q["question_id"]: q for q in questions}
    out = {}
    for a in answers:
        q = by_id[a["question_id"]]
        out[q["question_id"]] = mmmu_choice(a["text"], q["letters"], q["options"], random.Random(q["question_id"])) \
            if q["letters"] else a["text"]
    return out


def mmmu_scores(predictions: dict, questions: list[dict]) -> dict:
    """Accuracy (%) per subject, per category (the six disciplines) and overall, weighted by questions, on a
    split with answers (dev, validation)."""
    right: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        if q["question_id"] not in predictions:
            continue
        if q["answer"] is None:
            raise MGJaxError("MMMU: the questions have no answers (the test split): submit the predictions file")
        pred = predictions[q["question_id"]]
        gold = q["answer"]
        ok = (pred in gold if isinstance(gold, list) else pred == gold) if q["letters"] else mmmu_open_right(pred, gold)
        right[q["subject"]].append(ok)

    def acc(rs):
        return {"accuracy": 100 * sum(rs) / len(rs), "questions": len(rs)}

    categories = {c: [r for s in subjects for r in right.get(s, [])] for c, subjects in MMMU_CATEGORIES.items()}
    return {"overall": acc([r for rs in right.values() for r in rs]),
            "categories": {c: acc(rs) for c, rs in categories.items() if rs},
            "subjects": {s: acc(rs) for s, rs in sorted(right.items())}}


# MathVista: answer extraction, then MathVista's own normalisation and comparison (`calculate_score`).
def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def mathvista_extract(response: str, problem: dict) -> str:
    """The answer in a response. MathVista's own rules first (a response that is a choice, an integer or a
    float; 'The answer is "X".'); where those fail MathVista asks GPT-4, and this rule-based stand-in takes
    the last option letter ("(B)", "answer is B", a leading "B.") or choice text for a multiple-choice
    problem, the last number (list) for a numeric (list) one. Run MathVista's extraction on the
    `.mathvista.json` file for the official figure."""
    response = response.strip()
    choices = problem.get("choices") or []
    qtype, atype = problem["question_type"], problem["answer_type"]
    if not response:
        return ""
    if qtype == "multi_choice" and response in choices:
        return response
    cast = {"integer": int, "float": float}.get(atype)
    if cast:
        try:
            return str(cast(response))
        except ValueError:
            pass
    quoted = re.search(r'The answer is "(.*)"\.', response)
    if quoted:
        return quoted.group(1)
    if qtype == "multi_choice":
        letters = option_letters(len(choices))
        marked = re.findall(rf"\(([{letters}])\)", response) + \
            re.findall(rf"(?i:answer|option|choice)(?: is|:)?\s*([{letters}])\b", response)
        if marked:
            return marked[-1]
        if response[0] in letters and (len(response) == 1 or not response[1].isalnum()):
            return response[0]
        low = response.lower()
        named = [(low.rfind(str(c).lower()), str(c)) for c in choices if str(c).lower() in low]
        return max(named)[1] if named else response
    if atype == "list":
        lists = re.findall(r"\[[^\[\]]*\]", response)
        return lists[-1] if lists else response
    numbers = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
    return numbers[-1] if numbers else response


def mathvista_normalize(extraction: str, problem: dict) -> str | None:
    """MathVista's `normalize_extracted_answer`: a letter ("B" or "(B) ...") becomes its choice, any other
    multiple-choice text the most similar choice (edit distance); integers and floats (at the problem's
    precision) as canonical strings; None when a number does not parse."""
    choices = problem.get("choices") or []
    if problem["question_type"] == "multi_choice":
        extraction = str(extraction).strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = list(option_letters(len(choices)))
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [_edit_distance(extraction, str(c)) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if problem["answer_type"] == "integer":
            return str(int(float(extraction)))
        if problem["answer_type"] == "float":
            return str(round(float(extraction), int(problem.get("precision") or 0)))
    except ValueError:
        return None
    return str(extraction)


def mathvista_scores(answers: list[dict], questions: list[dict]) -> dict:
    """Accuracy (%) overall, per question and answer type and per metadata value (task, skills, grade,
    ...), on a split with answers (testmini)."""
    by_id = {q["question_id"]: q["problem"] for q in questions}
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    right = []
    for a in answers:
        problem = by_id[a["question_id"]]
        if problem.get("answer") in (None, ""):
            raise MGJaxError("MathVista: the problems have no answers (the test split): submit the answers")
        ok = mathvista_normalize(mathvista_extract(a["text"], problem), problem) == problem["answer"]
        right.append(ok)
        for key in ("question_type", "answer_type"):
            groups[key][problem[key]].append(ok)
        for key, value in (problem.get("metadata") or {}).items():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str):
                    groups[key][v].append(ok)
    return {"accuracy": 100 * sum(right) / len(right), "questions": len(right),
            "by": {k: {v: {"accuracy": 100 * sum(rs) / len(rs), "questions": len(rs)} for v, rs in sorted(g.items())}
                   for k, g in sorted(groups.items())}}


def mathvista_output(answers: list[dict], questions: list[dict], path: str | os.PathLike) -> Path:
    """What MathVista's `extract_answer.py` reads: {pid: the problem with its query and response}."""
    by_id = {q["question_id"]: q for q in questions}
    out = {a["question_id"]: {**by_id[a["question_id"]]["problem"], "query": a["prompt"], "response": a["text"]}
           for a in answers}
    path = Path(path)
    path.write_text(json.dumps(out, indent=2))
    return path
