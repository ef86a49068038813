"""Local scorers that compute what the official scripts compute, their quirks included, each rule named after
the official function it ports: LLaVA's `eval_pope.py`, `eval_science_qa.py`, `eval_textvqa.py` (m4c evaluator);
MME's `calculation.py` after LLaVA's `convert_answer_to_mme.py`; OpenCompass' `eval_mmbench.py`; MMMU's
`run_llava.py` / `main_eval_only.py` (`eval_utils`); MathVista's `extract_answer.py` / `calculate_score.py`. Where
an official step asks GPT (MMBench, MathVista) the local figure does what the docstrings say instead.
tests/test_official_scorers.py holds the official scripts' figures on crafted answer files."""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path

from mgjax.errors import MGJaxError

SHORT = "Answer the question using a single word or phrase."  # LLaVA's short-answer instruction
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
    """eval_pope.py: the first sentence, commas dropped; 'No', 'not' or 'no' as a word is a no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def _binary_scores(pairs: list[tuple[bool, bool]]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of (predicted yes, label yes) pairs, as eval_pope.py
    prints them (0 where it would divide by zero)."""
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / len(pairs), "questions": len(pairs)}


def pope_scores(answers: list[dict], questions: list[dict], label_dir: str | os.PathLike) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio per POPE category from the official label files
    `coco_pope_{category}.json` (JSONL with a yes/no `label`). Questions carry `category`.

    eval_pope.py pairs a category's answers (in answer-file order) with its label file's lines BY ORDER: LLaVA's
    question file numbers the categories 1.., 10000001.., 20000001.. while POPE numbers each file from 1, so
    question ids cannot be joined. A category without answers is left out (eval_pope.py divides by zero there)."""
    category = {q["question_id"]: q.get("category") for q in questions}
    unknown = [a["question_id"] for a in answers if a["question_id"] not in category]
    if unknown:
        raise MGJaxError(f"POPE: answer question_id {unknown[0]!r} is not in the question file; score the answers "
                         "with the question file they were made from")
    out = {}
    for cat in POPE_CATEGORIES:
        f = Path(label_dir) / f"coco_pope_{cat}.json"
        mine = [a for a in answers if category[a["question_id"]] == cat]
        if not f.is_file() or not mine:
            continue
        labels = [json.loads(line)["label"] for line in f.read_text().splitlines() if line.strip()]
        if len(labels) != len(mine):
            raise MGJaxError(f"POPE {cat}: {len(mine)} answers but {len(labels)} labels in {f}; the official "
                             "scorer pairs them by order, so answer every question of the category")
        # eval_pope.py: a label other than "no" counts as yes
        out[cat] = _binary_scores([(pope_yes(a["text"]), label != "no") for a, label in zip(mine, labels)])
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
    """calculation.py's parse_pred_ans (of the lower-cased text): yes / no, or what the first four characters
    say, else other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def _mme_key(answer: dict, gt: dict) -> tuple[str, str, str]:
    """convert_answer_to_mme.py: (category, ground-truth file, question) of an answer: the id's first part, its
    last part up to the first dot + .txt, the prompt without the short-answer instruction and with 'Please
    answer yes or no.' (after two spaces where the release has them)."""
    qid, prompt = answer["question_id"], answer["prompt"]
    category, file = qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"
    if SHORT in prompt:
        prompt = prompt.replace(SHORT, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt += " Please answer yes or no."
        if (category, file, prompt) not in gt:
            prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
    return category, file, prompt


def mme_scores(answers: list[dict], release: str | os.PathLike) -> dict:
    """Per category: acc (questions right, %), acc+ (images with both questions right, %) and score
    = acc + acc+; perception and cognition totals. Answers' question_id is `category/image.ext`.

    calculation.py takes a category's answers two by two in answer-file order as one image's pair (LLaVA's
    question file lists an image's two questions together)."""
    gt = mme_ground_truth(release)
    right: dict[str, list[bool]] = defaultdict(list)  # category -> answers right, in answer-file order
    for a in answers:
        key = _mme_key(a, gt)
        if key not in gt:
            raise MGJaxError(f"MME: no ground truth for {a['question_id']!r} / {key[2]!r} under {release}")
        right[key[0]].append(_mme_pred(a["text"]) == gt[key].lower())
    out = {}
    for category, rs in right.items():
        if len(rs) % 2:
            raise MGJaxError(f"MME {category}: {len(rs)} answers; MME's calculation.py takes them two by two (an "
                             "image's two questions), so answer both questions of every image")
        acc = 100 * sum(rs) / len(rs)
        acc_plus = 100 * sum(rs[i] and rs[i + 1] for i in range(0, len(rs), 2)) / (len(rs) // 2)
        out[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    out["perception"] = sum(out[c]["score"] for c in MME_PERCEPTION if c in out)
    out["cognition"] = sum(out[c]["score"] for c in MME_COGNITION if c in out)
    return out


def mmvet_submission(answers: list[dict], path: str | os.PathLike) -> Path:
    """The MM-Vet grader's input: {"v1_<question_id>": answer} (LLaVA's `convert_mmvet_for_eval.py`)."""
    path = Path(path)
    path.write_text(json.dumps({f"v1_{a['question_id']}": a["text"] for a in answers}, indent=2))
    return path


# pandas' default NA strings: eval_mmbench.py reads the prediction sheet with pandas and takes str(cell), so a
# prediction that is one of these (or empty) is read as "nan"
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
              "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _mmbench_option(answer: str) -> str | None:
    """eval_mmbench.py's can_infer_option: among the whitespace-split words, exactly one bare letter of A-E
    (unless 'A' is a word of a text of more than three words: maybe an article), else exactly one letter
    written 'B.', 'B,', 'B:', 'B)', 'B).', '(B)', '(B).', ':B', ':B,', ':B.', ':B)' or ':B).'."""
    choices = "ABCDE"  # can_infer_option's num_choice=5, whatever the question's options
    if "Failed to obtain answer via API" in answer:
        return None
    words = answer.split()

    def count(prefix, suffix):
        return sum(prefix + c + suffix in words for c in choices)

    if count("", "") == 1 and not ("A" in words and len(words) > 3):
        return next(c for c in choices if c in words)
    for prefix, suffix in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                           (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        if count(prefix, suffix) == 1:
            return next(c for c in choices if prefix + c + suffix in words)
    return None


def _mmbench_text(answer: str, choices: dict[str, str]) -> str | None:
    """eval_mmbench.py's can_infer_text: the one option whose text (lower case) is inside the answer."""
    found = [c for c, o in choices.items() if o.lower() in answer.lower()]
    return found[0] if len(found) == 1 else None


def mmbench_choices(question: dict) -> dict[str, str]:
    """eval_mmbench.py's build_choices of a question's sheet row: every one of the A-D cells that pandas does not
    read as missing (so "Nan" is an option there, while LLaVA's prompt stops before it)."""
    row = question["row"]
    return {c: row[c] for c in "ABCD" if row.get(c) is not None and row[c] not in _PANDAS_NA}


def mmbench_letter(text: str, choices: dict[str, str]) -> str | None:
    """The option an answer picks by eval_mmbench.py's can_infer (a letter, else an option's text; `choices` as
    `mmbench_choices` gives them), the text read as pandas reads the sheet; None where the official evaluator
    would ask ChatGPT."""
    text = "nan" if text in _PANDAS_NA else text
    return _mmbench_option(text) or _mmbench_text(text, choices)


CIRCULAR = 1_000_000  # MMBench numbers a question's circular variants index + k * CIRCULAR


def mmbench_scores(answers: list[dict], questions: list[dict]) -> dict:
    """Circular accuracy in %, overall and per category, on a split with answers (dev), as eval_mmbench.py's
    eval_result counts it: each answered question (index < 1e6) is right when every answered variant of it (index
    modulo 1e6) picks the right option by `mmbench_letter`. Where can_infer reads no option the official evaluator
    asks ChatGPT; here that variant counts as wrong (the official figure with ChatGPT answering "E", no option)."""
    truth = {q["question_id"]: q for q in questions}
    variants: dict[int, list[bool]] = defaultdict(list)
    for a in answers:
        q = truth[a["question_id"]]
        if q.get("answer") is None:
            raise MGJaxError("MMBench: the questions have no answers (the test split): submit the sheet instead")
        variants[int(q["question_id"]) % CIRCULAR].append(mmbench_letter(a["text"], mmbench_choices(q)) == q["answer"])
    mains = sorted(int(a["question_id"]) for a in answers if int(a["question_id"]) < CIRCULAR)
    by_category: dict[str, list[bool]] = defaultdict(list)
    for main in mains:
        by_category[truth[main].get("category") or "-"].append(all(variants[main]))
    ok = [all(variants[main]) for main in mains]
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


SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options, whatever the number of choices


def scienceqa_letter(text: str) -> str | None:
    """eval_science_qa.py's parsing: the text is one of A-E, or starts "X. " with X one of them, or holds exactly
    one match of r'The answer is ([A-Z]).' (the '.' any character); else None (its "FAILED")."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


def scienceqa_scores(answers: list[dict], problems_file: str | os.PathLike) -> dict:
    """Accuracy (%) over all answered problems and over the image ones (ScienceQA-IMG, the paper's number), from
    ScienceQA's `problems.json` (choices, answer index). As eval_science_qa.py, a problem is an image one when its
    answer's prompt holds "<image>" (model_vqa_science.py's marker). eval_science_qa.py also counts a test problem
    without an answer as wrong: on the whole test split the two agree."""
    try:
        problems = json.loads(Path(problems_file).read_text())
    except (OSError, ValueError) as e:
        raise MGJaxError(f"{problems_file}: not ScienceQA's problems.json ({e})") from None
    right, right_img = [], []
    for a in answers:
        p = problems.get(str(a["question_id"]))
        if p is None:
            raise MGJaxError(f"ScienceQA: question {a['question_id']!r} is not in {problems_file}")
        # get_pred_idx: a letter past the problem's choices is wrong
        ok = scienceqa_letter(a["text"]) == SCIENCEQA_OPTIONS[p["answer"]]
        right.append(ok)
        if "<image>" in a["prompt"]:
            right_img.append(ok)
    return {"accuracy": 100 * sum(right) / len(right), "img_accuracy": 100 * sum(right_img) / max(len(right_img), 1),
            "questions": len(right), "img_questions": len(right_img)}


# TextVQA: the answer processing of the m4c evaluator LLaVA scores with (`m4c_evaluator.py`'s EvalAIAnswerProcessor,
# MGM_SPEC section 10): its tables literally, quirks included (keys with capitals never match the lower-cased
# words; "somebody'd" becomes "somebodyd").
VQA_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't",
    'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd", 'howll': "how'll",
    'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't", 'itd': "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's", 'maam': "ma'am",
    'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock",
    'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're", 'theres': "there's",
    'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're",
    'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've",
    'whens': "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've",
    'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've",
    'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll",
    'youre': "you're", 'youve': "you've",
}
_NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# (?!<=\d) is a lookahead, not the lookbehind it looks like: the reference's typo, kept
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                 "!")


def _vqa_punctuation(text: str) -> str:
    """process_punctuation: a mark next to a space (or any mark, in a text with a digit-comma-digit, which
    word_tokenize has already removed) is dropped, otherwise made a space; then periods not before a digit go
    (re.UNICODE passed where `count` goes: at most 32 of them)."""
    out = text
    for p in _PUNCTUATIONS:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def vqa_normalize(answer: str) -> str:
    """An answer as EvalAIAnswerProcessor.__call__ compares it: word_tokenize (lower case, ',' '?' dropped, "'s"
    split off), newlines and tabs as spaces, process_punctuation, then process_digit_article (number words as
    digits, articles dropped, the CONTRACTIONS table applied word by word)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """TextVQAAccuracyEvaluator: min(#other humans who gave it / 3, 1) averaged over the 10 leave-one-out subsets
    of the (normalised) human answers."""
    gts = [vqa_normalize(a) for a in gt_answers]
    pred = vqa_normalize(prediction)
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs) if accs else 0.0


def textvqa_question(prompt: str) -> str:
    """eval_textvqa.py's prompt_processor: the question of a prompt, lower case ("OCR tokens: ... Question: X Short
    answer:"; of three lines with a "Reference OCR token: " line the second when that line comes first, else the
    first; of two lines the first); with the image id it finds the annotation."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    else:
        question = lines[0] if len(lines) == 2 else None
    if question is None:
        raise MGJaxError(f"TextVQA: eval_textvqa.py cannot find the question in the prompt {prompt!r}: it takes "
                         "LLaVA's question-file text (question, OCR line, instruction)")
    return question.lower()


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


# run_llava.py answers the subjects in its CAT_SHORT2LONG order, which is alphabetical
MMMU_RUN_ORDER = tuple(sorted(s for subjects in MMMU_CATEGORIES.values() for s in subjects))


def mmmu_choice(response: str, letters: list[str], options: list[str], rng) -> str:
    """eval_utils.parse_multi_choice_response: "(B)" anywhere, else " B " as a word, else (in a response of more
    than five words) an option's text; of several, the one mentioned last; none: rng.choice(letters) (`rng` a
    `random.Random`; MMMU draws from the global stream)."""
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
    return candidates[where.index(max(where))]  # np.argmax: the first of equal ones


def _mmmu_normalize(text: str) -> list:
    """eval_utils.normalize_str: what float() reads (commas dropped; so also "1_000", "inf", "nan") rounded to 2
    places, else the lower-cased string, a single character with a space on either side (to match as a word)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]  # check_is_number
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _mmmu_numbers(text: str) -> list[str]:
    """eval_utils.extract_numbers: numbers with thousands commas, in scientific notation, then plain ones; an
    integer ends at a word boundary, so "5cm" holds no number (a decimal has no such rule: "0.5cm" holds 0.5)."""
    return (re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text) + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
            + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text))


def mmmu_open_candidates(response: str) -> list:
    """eval_utils.parse_open_response: per sentence (split at newlines; the split at ". " before a capital never
    fires, the text being lower-cased first) the shortest tail after an indicator ("so ", "is ", "therefore ",
    ... and "=" in the last), else the whole response; plus the numbers in them; normalised, without
    duplicates."""
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
    out = []
    for x in (y for f in keys + [n for k in keys for n in _mmmu_numbers(k)] for y in _mmmu_normalize(f)):
        if x not in out:
            out.append(x)
    return out


def mmmu_open_right(response: str, gold) -> bool:
    """eval_utils.eval_open: right when a normalised gold answer is a number among the candidates, or a string
    inside a candidate string."""
    golds = [y for g in (gold if isinstance(gold, list) else [gold]) for y in _mmmu_normalize(str(g))]
    for pred in mmmu_open_candidates(response):
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def _mmmu_run_position(q: dict) -> int:
    if q["subject"] not in MMMU_RUN_ORDER:
        raise MGJaxError(f"MMMU question {q['question_id']!r}: {q['subject']!r} is not an MMMU subject")
    return MMMU_RUN_ORDER.index(q["subject"])


def mmmu_predictions(answers: list[dict], questions: list[dict]) -> dict:
    """MMMU's output file: {id: the parsed letter of a multiple-choice answer, or the open response}, in answer
    order. run_llava.py parses the answers subject by subject (MMMU_RUN_ORDER, each in its data's order) drawing the
    letters of unparseable ones from Python's global random seeded 42 (set_seed): one `random.Random(42)` consumed
    in that order gives the same letters."""
    text = {a["question_id"]: a["text"] for a in answers}
    rng = random.Random(42)
    parsed = {}
    for q in sorted((q for q in questions if q["question_id"] in text), key=_mmmu_run_position):  # stable sort
        parsed[q["question_id"]] = mmmu_choice(text[q["question_id"]], q["letters"], q["options"], rng) \
            if q["letters"] else text[q["question_id"]]
    return {qid: parsed[qid] for qid in text}


def mmmu_scores(predictions: dict, questions: list[dict]) -> dict:
    """Accuracy (%) per subject, per category (the six disciplines) and overall, weighted by questions, on a
    split with answers (dev, validation): main_eval_only.py's eval_multi_choice (the letter is, or is among, the
    gold) and eval_open, instance-weighted as calculate_ins_level_acc."""
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


# MathVista: answer extraction (`extract_answer.py`), then MathVista's normalisation and comparison
# (`calculate_score.py`).
def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, as the `Levenshtein.distance` that calculate_score.py's get_most_similar uses."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def mathvista_quick_extract(response: str, problem: dict) -> str | None:
    """extract_answer.py's extract_answer (with --quick_extract) up to its GPT step: "" for an empty response, the
    response itself when it is one of the choices, str(int(response)) for an integer problem, str(float(response))
    for a float one (so "inf" and "nan" too), the X of 'The answer is "X".'; None where it would ask GPT."""
    if response == "":
        return ""
    if problem["question_type"] == "multi_choice" and response in problem["choices"]:
        return response
    for answer_type, cast in (("integer", int), ("float", float)):
        if problem["answer_type"] == answer_type:
            try:
                return str(cast(response))
            except ValueError:
                pass
    quoted = re.search(r'The answer is "(.*)"\.', response)
    return quoted.group(1) if quoted else None


def _mathvista_gpt_stand_in(response: str, problem: dict) -> str:
    """Instead of extract_answer.py's GPT-4 extraction: for a multiple-choice problem the last option letter
    ("(B)", "answer is B", "option: B") or a leading "B." / "B", else the choice text mentioned last, else the
    response; for a list problem the last [...]; else the last number (commas dropped), else the response."""
    response = response.strip()
    if problem["question_type"] == "multi_choice":
        choices = problem["choices"]
        letters = option_letters(len(choices))
        marked = re.findall(rf"\(([{letters}])\)", response) + \
            re.findall(rf"(?i:answer|option|choice)(?: is|:)?\s*([{letters}])\b", response)
        if marked:
            return marked[-1]
        if response and response[0] in letters and (len(response) == 1 or not response[1].isalnum()):
            return response[0]
        low = response.lower()
        named = [(low.rfind(str(c).lower()), str(c)) for c in choices if str(c).lower() in low]
        return max(named)[1] if named else response
    if problem["answer_type"] == "list":
        lists = re.findall(r"\[[^\[\]]*\]", response)
        return lists[-1] if lists else response
    numbers = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
    return numbers[-1] if numbers else response


def mathvista_extract(response: str, problem: dict) -> str:
    """The answer in a response: MathVista's rules (`mathvista_quick_extract`), else the local stand-in for its
    GPT-4 step (`_mathvista_gpt_stand_in`)."""
    quick = mathvista_quick_extract(response, problem)
    return _mathvista_gpt_stand_in(response, problem) if quick is None else quick


def mathvista_normalize(extraction, problem: dict) -> str | None:
    """calculate_score.py's normalize_extracted_answer: multiple choice: the extraction as a stripped string, the
    letter of "(b) ..." upper-cased, a letter made its choice, any other text the most similar choice (edit
    distance, the first of equal ones); integer: str(int(float(x))); float: str(round(float(x), int(precision)));
    list: str(x); None where a conversion fails (so "inf" for an integer, any float without a precision)."""
    qtype, atype, choices = problem["question_type"], problem["answer_type"], problem.get("choices")
    if qtype == "multi_choice":
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = list(option_letters(len(choices)))
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [_edit_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if atype == "integer":
            return str(int(float(extraction)))
        if atype == "float":
            return str(round(float(extraction), int(problem.get("precision"))))
    except (ValueError, TypeError, OverflowError):  # calculate_score.py: `except Exception` -> None
        return None
    if atype == "list":
        return str(extraction)
    raise MGJaxError(f"MathVista problem {problem.get('pid')!r}: answer_type {atype!r} is none of integer, float, "
                     "list (calculate_score.py has no rule for it)")


def mathvista_scores(answers: list[dict], questions: list[dict]) -> dict:
    """Accuracy (%) overall, per question and answer type and per metadata value (task, skills, grade, ...), on a
    split with answers (testmini): `mathvista_extract`, then `mathvista_normalize` equal to the answer
    (calculate_score.py's safe_equal)."""
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
