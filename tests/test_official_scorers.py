"""mgjax's local scorers against the figures the official scripts gave on the same crafted answer files.

tests/fixtures/official_scorers/<bench>/ holds answer lines as mgjax's runner writes them, crafted to hit each
scorer's quirks, with the small question and ground-truth files they need. Each official script was run once on
exactly those files (in a scratch folder, its network/GPT/GPU parts stubbed as said at each test); the figures it
printed are recorded below as literals. Neither the scripts nor the network are needed here.

Sources: LLaVA (haotian-liu/LLaVA c121f0432da27facab705978f83c4ada465e46fd: llava/eval/eval_pope.py,
eval_science_qa.py, eval_textvqa.py + m4c_evaluator.py, scripts/convert_mmbench_for_submission.py; the MME
convert_answer_to_mme.py of its eval package: playground/data/eval/MME/ at
32cebc3809441cc40d8ac7b2855d148308741f2a), MME's eval_tool/calculation.py
(BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation, tools/eval_tool.zip at
1c1d69e138b57cf8b0400427927bfb8ed4285458), OpenCompass tools/eval_mmbench.py (open-compass/opencompass
f1ee11de14909276eb790c1febf85ff67b1c142a, the last commit that has it), MMMU (MMMU-Benchmark/MMMU
bb0b95a945998d91dfef37e969e07d49d1139438: mmmu/run_llava.py, main_eval_only.py, utils/eval_utils.py), MathVista
(lupantech/MathVista 53d525874bdde205128e6b160b7357a88277d479: evaluation/extract_answer.py, calculate_score.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mgjax.errors import MGJaxError
from mgjax.eval import scores as sc
from mgjax.eval.benchmarks import BENCHES, read_mathvista, read_mmbench, read_mmmu, read_scienceqa

FIX = Path(__file__).parent / "fixtures" / "official_scorers"


def _answers(bench: str) -> list[dict]:
    return sc.read_answers(FIX / bench / "answers.jsonl")


def test_pope_pairs_by_order_as_eval_pope():
    """LLaVA numbers the categories' questions 1.., 10000001.., 20000001..; the label files each from 1."""
    # python llava/eval/eval_pope.py --annotation-dir pope/coco --question-file pope/llava_pope_test.jsonl
    #   --result-file pope/answers.jsonl
    # printed per category: TP FP TN FN, then accuracy, precision, recall, F1, yes ratio
    official = {"adversarial": ((1, 1, 1, 2), 0.4, 0.5, 0.3333333333333333, 0.4, 0.4),
                "popular": ((2, 1, 1, 0), 0.75, 0.6666666666666666, 1.0, 0.8, 0.75),
                "random": ((1, 1, 1, 0), 0.6666666666666666, 0.5, 1.0, 0.6666666666666666, 0.6666666666666666)}
    questions = sc.read_answers(FIX / "pope" / "llava_pope_test.jsonl")
    answers = _answers("pope")
    scores = sc.pope_scores(answers, questions, FIX / "pope" / "coco")
    assert set(scores) == set(official)
    for cat, (counts, *metrics) in official.items():
        s = scores[cat]
        assert s["questions"] == sum(counts)
        assert [s[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx(metrics)
    # eval_pope.py would zip the lists and print a figure for the wrong pairs: a missing answer is an error
    with pytest.raises(MGJaxError, match="3 answers but 4 labels"):
        sc.pope_scores([a for a in answers if a["question_id"] != 10000002], questions, FIX / "pope" / "coco")


def _mme_release(root: Path) -> Path:
    """The MME release layout from mme/release.json: {category: {flat, files: {name: [[question, answer]]}}}."""
    for category, spec in json.loads((FIX / "mme" / "release.json").read_text()).items():
        qa = root / category if spec["flat"] else root / category / "questions_answers_YN"
        qa.mkdir(parents=True)
        if not spec["flat"]:
            (root / category / "images").mkdir()
        for name, pairs in spec["files"].items():
            (qa / name).write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
    return root


def test_mme_matches_calculation(tmp_path):
    """All 14 categories (calculation.py reads each); prompts with and without the instruction, the release's
    double space, "landmark/1.v2.jpg" (the ground-truth file is the name up to its first dot), and "color" asking
    two images in turn (calculation.py pairs the lines as they come)."""
    # python convert_answer_to_mme.py --experiment crafted (cwd: the release as MME_Benchmark_release_version,
    # answers/crafted.jsonl = mme/answers.jsonl), then python eval_tool/calculation.py --results_dir
    # answers/crafted; it printed the per-category scores (acc + acc+, in %) and the totals
    official = {"existence": 25.0, "count": 50.0, "position": 50.0, "color": 50.0, "posters": 0.0, "celebrity": 50.0,
                "scene": 125.0, "landmark": 50.0, "artwork": 0.0, "OCR": 50.0, "commonsense_reasoning": 200.0,
                "numerical_calculation": 50.0, "text_translation": 25.0, "code_reasoning": 50.0}
    scores = sc.mme_scores(_answers("mme"), _mme_release(tmp_path / "MME"))
    assert {c: scores[c]["score"] for c in official} == pytest.approx(official)
    assert scores["perception"] == pytest.approx(450.0) and scores["cognition"] == pytest.approx(325.0)
    assert scores["color"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}


def test_scienceqa_matches_eval_science_qa():
    """The answer file carries model_vqa_science's prompt ("<image>\\n" first for an image question), which
    eval_science_qa.py reads for ScienceQA-IMG; its parsing: a letter of A-E (past the choices: wrong), "X. ",
    exactly one "The answer is X." (any character after X; "the answer is" in lower case does not count)."""
    # the prompts are what mgjax's runner writes for LLaVA's question file
    questions = read_scienceqa(FIX / "scienceqa" / "llava_test_CQM-A.json")
    bench = BENCHES["scienceqa"]
    assert [bench.answer_fields(q)["prompt"] for q in questions] == [a["prompt"] for a in _answers("scienceqa")]
    # python llava/eval/eval_science_qa.py --base-dir scienceqa --result-file scienceqa/answers.jsonl
    #   --output-file out.json --output-result res.json
    # printed "Total: 10, Correct: 5, Accuracy: 50.00%, IMG-Accuracy: 57.14%"; out.json: 4 of the 7 problems with
    # is_multimodal right, and these parsed_ans ("FAILED" as None)
    parsed = {"4": "B", "7": "C", "9": "A", "12": "B", "15": "E", "18": "A", "21": "E", "24": None, "27": None,
              "30": None}
    assert {a["question_id"]: sc.scienceqa_letter(a["text"]) for a in _answers("scienceqa")} == parsed
    s = sc.scienceqa_scores(_answers("scienceqa"), FIX / "scienceqa" / "problems.json")
    assert s == {"accuracy": 50.0, "img_accuracy": pytest.approx(100 * 4 / 7), "questions": 10, "img_questions": 7}


def test_textvqa_matches_m4c_evaluator():
    """EvalAIAnswerProcessor's fixed contraction table ("were" stays "were", "wed" and "hadntve" are not
    contractions, "somebody'd" becomes "somebodyd", "Im" never matches its capital key), punctuation, numbers,
    articles; the three prompt layouts eval_textvqa.py's prompt_processor reads."""
    # python -m llava.eval.eval_textvqa --annotation-file textvqa/TextVQA_0.5.1_val.json --result-file
    #   textvqa/answers.jsonl printed "Samples: 13, Accuracy: 69.23%"; per answer (the same modules, imported:
    # EvalAIAnswerProcessor of the answer, then _compute_answer_scores of its annotation):
    processed = ["were", "wed", "hadntve", "don't", "somebodyd", "coca cola", "2 dogs", "12000", "x y", "eg 1.5",
                 "it 's red", "0", "im"]
    per_answer = [0.6000000000000001, 0.0, 0.0, 1.0, 0.9, 1.0, 1.0, 0.9, 1.0, 0.6, 1.0, 1.0, 0.0]
    answers = _answers("textvqa")
    assert [sc.vqa_normalize(a["text"]) for a in answers] == processed
    annotations = {(a["image_id"], a["question"].lower()): a["answers"]
                   for a in json.loads((FIX / "textvqa" / "TextVQA_0.5.1_val.json").read_text())["data"]}
    assert [sc.vqa_accuracy(a["text"], annotations[(a["question_id"], sc.textvqa_question(a["prompt"]))])
            for a in answers] == pytest.approx(per_answer)
    s = sc.textvqa_scores(answers, FIX / "textvqa" / "TextVQA_0.5.1_val.json")
    assert s == {"accuracy": pytest.approx(100 * 0.6923076923076923), "questions": 13}
    with pytest.raises(MGJaxError, match="cannot find the question"):
        sc.textvqa_question("What is it?\nline\nline\nline")


def test_mmbench_matches_eval_mmbench():
    """can_infer: "The answer is B. dog", "Answer: (D)", "(B) right" by letter; "dog", "category" (holds "cat"),
    "Right." by option text; "A blue one" is A (a short text); "D" of three options and "E" are letters; a
    "None" prediction is read as "nan" (pandas), which holds the option "Nan"; "sun or moon" (two options) and "I
    think A is right" (A may be an article) are unreadable. A question counts when all its variants are right."""
    # python scripts/convert_mmbench_for_submission.py --annotation-file mmbench/mmbench_dev_20230712.tsv
    #   --result-dir <dir with answers.jsonl as crafted.jsonl> --upload-dir up --experiment crafted, then
    # python tools/eval_mmbench.py up/crafted.xlsx --meta mmbench/mmbench_dev_20230712.tsv with
    # opencompass.models.OpenAI stubbed as a ChatGPT that answers "E" (no option). It asked ChatGPT about "sun or
    # moon" and "I think A is right" only; result pkl {1: 1, 2: 1, 3: 0, 4: 0, 5: 1, 6: 1, 7: 0, 8: 0}; overall
    # (dev) 0.5, per category attribute 1.0, perception 0.666667, reasoning 0.0. mgjax's own sheet
    # (mmbench_submission, saved as .xlsx with pandas) gave the same pkl.
    questions = read_mmbench(FIX / "mmbench" / "mmbench_dev_20230712.tsv")
    by_id = {q["question_id"]: q for q in questions}
    answers = _answers("mmbench")
    unreadable = [a["text"] for a in answers
                  if sc.mmbench_letter(a["text"], sc.mmbench_choices(by_id[a["question_id"]])) is None]
    assert unreadable == ["sun or moon", "I think A is right", "Both A and B"]  # the last: its question is lost before
    s = sc.mmbench_scores(answers, questions)
    assert s == {"circular_accuracy": 50.0, "questions": 8,
                 "per_category": {"attribute": 100.0, "perception": pytest.approx(200 / 3), "reasoning": 0.0}}


def test_mmmu_matches_run_llava_and_main_eval_only():
    """The multiple-choice letters of run_llava.py (parse_multi_choice_response; unreadable answers draw from
    Python's random seeded 42, in its subject order: Accounting, Art, Math here, though the question file lists
    Math first) and the open answers by eval_open ("5cm" holds no number, "0.5cm" holds 0.5)."""
    # run_llava.py main() (seed 42, configs/llava1.5.yaml) with torch, llava and datasets stubbed, load_dataset
    # giving mmmu/questions.jsonl's rows of each subject and the model answering mmmu/answers.jsonl; it wrote:
    official_output = {
        "validation_Accounting_1": "B", "validation_Accounting_2": "A", "validation_Accounting_3": "5cm",
        "validation_Accounting_4": "A", "validation_Art_1": "C", "validation_Art_2": "C", "validation_Art_3": "B",
        "validation_Art_4": "D", "validation_Art_5": "B", "validation_Math_1": "5 cm",
        "validation_Math_2": "The answer is 0.5", "validation_Math_3": "1,000", "validation_Math_4": "so x = 3.14159",
        "validation_Math_5": "A", "validation_Math_6": "A", "validation_Math_7": "The value is 2.5e3",
        "validation_Math_8": "10%", "validation_Math_9": "It is Paris.",
        "validation_Math_10": "4 sides\nthe total is 8", "validation_Math_11": "5cm",
        "validation_Math_12": "about 0.5cm", "validation_Math_13": "B"}
    # python main_eval_only.py --output_path <that output> --answer_path <the rows' {question_type, ground_truth}>
    # printed Accounting 0.5 (4), Art 0.6 (5), Math 0.692 (13), Overall 0.636 (22); eval_utils.evaluate on the same
    # samples judged these wrong (the rest right):
    official_wrong = {"validation_Accounting_2", "validation_Accounting_3", "validation_Art_1", "validation_Art_5",
                      "validation_Math_5", "validation_Math_10", "validation_Math_11", "validation_Math_13"}
    questions = read_mmmu(FIX / "mmmu" / "questions.jsonl")
    predictions = sc.mmmu_predictions(_answers("mmmu"), questions)
    assert predictions == official_output
    wrong = {q["question_id"] for q in questions
             if not (predictions[q["question_id"]] == q["answer"] if q["letters"]
                     else sc.mmmu_open_right(predictions[q["question_id"]], q["answer"]))}
    assert wrong == official_wrong
    s = sc.mmmu_scores(predictions, questions)
    assert s["subjects"] == {"Accounting": {"accuracy": 50.0, "questions": 4},
                             "Art": {"accuracy": 60.0, "questions": 5},
                             "Math": {"accuracy": pytest.approx(900 / 13), "questions": 13}}
    assert s["overall"] == {"accuracy": pytest.approx(100 * 14 / 22), "questions": 22}


def test_mathvista_normalisation_matches_calculate_score():
    """normalize_extracted_answer and safe_equal on crafted extractions: "inf" / "nan" for an integer are None (no
    error), "1e500" a float "inf", "7.9" an integer "7", "1.25" at one place "1.2", "1,000" None, a float without a
    precision None, "" and "b" the first most similar choice, " (b) " its choice."""
    # python evaluation/calculate_score.py --output_dir <d> --output_file extractions.json (the problems of
    # mathvista/testmini.json, each with its extraction of mathvista/extractions.json; datasets stubbed) wrote
    # these predictions and "Correct: 4/17"
    official = {"1": "45°", "2": "45°", "3": None, "4": None, "5": "7", "6": "2", "7": "inf", "8": "1.2", "9": "1.4",
                "10": None, "11": "[1,2,3]", "12": None, "13": "30°", "14": None, "15": "30°", "16": "45°", "17": None}
    problems = json.loads((FIX / "mathvista" / "testmini.json").read_text())
    extractions = json.loads((FIX / "mathvista" / "extractions.json").read_text())
    predictions = {pid: sc.mathvista_normalize(extractions[pid], p) for pid, p in problems.items()}
    assert predictions == official
    assert sum(predictions[pid] == p["answer"] for pid, p in problems.items()) == 4


def test_mathvista_rule_extraction_matches_extract_answer():
    """extract_answer's rules before GPT-4: no strip (" 45°" is not a choice), int() and float() as Python reads
    them (" 7 ", "1_000", "inf", "nan"), 'The answer is "X".'; the other responses go to GPT-4, which the local
    score replaces by its rule-based stand-in."""
    # python -m evaluation.extract_answer --results_file_path <mgjax's ANSWERS.mathvista.json of
    # mathvista/answers.jsonl> --quick_extract, the GPT model stubbed to fail (so extract_answer logs the problem
    # and keeps ""); it asked GPT-4 about problems 2, 5, 6, 10, 15, 16 and extracted for the others:
    official = {"1": "45°", "3": "7", "4": "7", "7": "1.5", "8": "inf", "9": "nan", "11": "[1, 2, 3]", "12": "1000",
                "13": "", "14": "", "17": "1.5"}
    asked_gpt = {"2", "5", "6", "10", "15", "16"}
    # calculate_score.py on that file then judged right problems 1, 3, 4, 7, 11, 12, 13
    right = {"1", "3", "4", "7", "11", "12", "13"}
    problems = {q["question_id"]: q["problem"] for q in read_mathvista(FIX / "mathvista" / "testmini.json")}
    quick = {a["question_id"]: sc.mathvista_quick_extract(a["text"], problems[a["question_id"]])
             for a in _answers("mathvista")}
    assert {pid for pid, e in quick.items() if e is None} == asked_gpt
    assert {pid: e for pid, e in quick.items() if e is not None} == official
    assert {pid for pid, e in official.items() if sc.mathvista_normalize(e, problems[pid]) == problems[pid]["answer"]} \
        == right
