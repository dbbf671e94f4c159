"""The two scoring profiles (nvlm_d.evaluation.scoring) against the reference implementations installed from PyPI
(lmms-eval's task functions, `anls`, pycocoevalcap) and, where the profiles disagree, against the formulas of
Megatron-LM NVLM-1.0 written out by hand."""

from __future__ import annotations

import copy
import random
import shutil

import pytest

pytest.importorskip("lmms_eval", reason="the [eval] extra (lmms-eval) is not installed")

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor  # noqa: E402
from lmms_eval.tasks.chartqa.utils import relaxed_correctness  # noqa: E402
from lmms_eval.tasks.mmmu.utils import parse_multi_choice_response  # noqa: E402
from lmms_eval.tasks.ocrbench.utils import ocrbench_process_results  # noqa: E402
from lmms_eval.tasks.vqav2.utils import vqav2_process_results  # noqa: E402

from nvlm_d.evaluation import prompts, scoring  # noqa: E402

WORDS = ["stop", "Stop.", "two", "2", "a dog", "the dog", "dog", "yes", "no", "red car", "dont", "don't", "3,000"]


def _vqa_cases(count: int = 300) -> list[tuple[str, list[str]]]:
    rng = random.Random(0)
    cases = []
    for _ in range(count):
        answers = [rng.choice(WORDS) for _ in range(10)]
        if len(set(answers)) == 1:
            answers[0] = "maybe"
        cases.append((rng.choice(WORDS), answers))
    return cases


def test_standard_vqa_accuracy_equals_lmms_eval_vqav2_where_annotators_disagree():
    for prediction, answers in _vqa_cases():
        doc = {"question_id": 1, "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]}
        expected = vqav2_process_results(copy.deepcopy(doc), [prediction])["exact_match"]
        assert scoring.vqa_accuracy_standard(prediction, answers) == pytest.approx(expected), (prediction, answers)


@pytest.mark.parametrize(
    ("matches", "standard", "nvlm"), [(1, 0.3, 1 / 3), (2, 0.6, 2 / 3), (3, 0.9, 1.0), (4, 1.0, 1.0)]
)
def test_vqa_profiles_differ_on_k_matching_annotators(matches, standard, nvlm):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert scoring.vqa_accuracy_standard("cat", answers) == pytest.approx(standard)
    assert scoring.vqa_accuracy_nvlm("cat", answers) == pytest.approx(nvlm)


def test_standard_vqa_normalises_only_when_annotators_disagree():
    assert scoring.vqa_accuracy_standard("Stop.", ["stop"] * 10) == 0.0
    assert scoring.vqa_accuracy_nvlm("Stop.", ["stop"] * 10) == 1.0


def test_vqa_normalisation_is_the_official_one():
    processor = EvalAIAnswerProcessor()
    for text in ["Two dogs!", "the  Red-car", "isnt it", "3,000", "A (small) cat.", "ten"]:
        assert scoring.vqa_normalize(text) == processor.process_digit_article(processor.process_punctuation(text))
    assert scoring.vqa_normalize("Two dogs!") == "2 dogs"


CHART_CASES = [
    ("45", "45"),
    ("46", "45"),
    ("48", "45"),
    ("0.45", "45%"),
    ("Yes", "yes"),
    ("no", "yes"),
    ("12.5", "12"),
    ("1,000", "1000"),
    ("-3", "-3"),
    ("3", "-3"),
    ("0", "0"),
    ("0.0", "0"),
    ("2019", "2018"),
    ("abc", "ABC"),
    ("99.9", "100"),
    ("94", "100"),
    ("1e3", "1000"),
]


def test_standard_relaxed_accuracy_equals_lmms_eval_chartqa():
    for prediction, answer in CHART_CASES:
        expected = 1.0 if relaxed_correctness(prediction, answer) else 0.0
        assert scoring.relaxed_accuracy_standard(prediction, [answer]) == expected, (prediction, answer)


@pytest.mark.parametrize(("prediction", "answer"), [("45%", "45"), ("-10", "10"), ("0.0", "0"), ("two", "2")])
def test_relaxed_accuracy_profiles_disagree_where_megatron_normalises(prediction, answer):
    assert scoring.relaxed_accuracy_nvlm(prediction, [answer]) == 1.0
    assert scoring.relaxed_accuracy_standard(prediction, [answer]) == 0.0


def test_nvlm_relaxed_accuracy_keeps_the_five_percent_rule():
    assert scoring.relaxed_accuracy_nvlm("104", ["100"]) == 1.0
    assert scoring.relaxed_accuracy_nvlm("106", ["100"]) == 0.0
    assert scoring.relaxed_accuracy_nvlm("Blue", ["blue"]) == 1.0


def _anls_by_hand(prediction: str, answers: list[str]) -> float:
    def distance(a: str, b: str) -> int:
        row = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            previous, row[0] = row[0], i
            for j, cb in enumerate(b, 1):
                previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
        return row[-1]

    def norm(text: str) -> str:
        return " ".join(text.strip().lower().split())

    best = 0.0
    for answer in answers:
        p, t = norm(prediction), norm(answer)
        nl = distance(p, t) / max(len(p), len(t)) if max(len(p), len(t)) else 0.0
        best = max(best, 1 - nl if nl < 0.5 else 0.0)
    return best


@pytest.mark.parametrize(
    ("prediction", "answers"),
    [
        ("helo", ["hello"]),
        ("Hello  World", ["hello world"]),
        ("abc", ["xyz"]),
        ("1/2/2020", ["1/2/2020", "x"]),
        ("acme corp", ["ACME Corp.", "Acme"]),
        ("", ["a"]),
    ],
)
def test_anls_matches_the_definition(prediction, answers):
    assert scoring.anls(prediction, answers) == pytest.approx(_anls_by_hand(prediction, answers))


OCR_CASES = [
    ("The word is HELLO", ["hello"], "IIIT5K"),
    ("helo", ["hello"], "IIIT5K"),
    ("x^2 + 1", ["x^2+1"], "HME100k"),
    ("X^2+1", ["x^2+1"], "HME100k"),
    ("cat and dog", ["cat", "dog"], "docVQA"),
    ("nothing", ["cat", "dog"], "docVQA"),
]


def test_standard_ocrbench_equals_lmms_eval():
    for prediction, answers, dataset in OCR_CASES:
        doc = {"answer": answers, "dataset": dataset, "question_type": "Regular Text Recognition"}
        expected = ocrbench_process_results(doc, [prediction])["ocrbench_accuracy"]["score"]
        assert scoring.ocrbench_standard(prediction, answers, dataset) == expected, (prediction, answers)


def test_nvlm_ocrbench_counts_each_matching_answer():
    assert scoring.ocrbench_nvlm("cat and dog", ["cat", "dog"], "docVQA") == 2.0
    assert scoring.ocrbench_standard("cat and dog", ["cat", "dog"], "docVQA") == 1.0


MC_CASES = ["(B)", "B", "The answer is (C).", "A. red", "I think it is blue because of the sky", "C", "(A) and (B)"]


def test_choice_parser_equals_the_mmmu_parser_when_it_finds_a_letter():
    options = ["red", "blue", "green"]
    for response in MC_CASES:
        expected = parse_multi_choice_response(response, ["A", "B", "C"], dict(zip("ABC", options, strict=True)))
        assert scoring.parse_choice(response, options, "id-1") == expected, response


def test_choice_parser_fallback_is_seeded_by_the_record():
    options = ["red", "blue", "green", "grey"]
    picks = {scoring.parse_choice("no idea", options, f"id-{n}") for n in range(20)}
    assert picks <= {"A", "B", "C", "D"} and len(picks) > 1
    assert scoring.parse_choice("no idea", options, "id-7") == scoring.parse_choice("no idea", options, "id-7")


@pytest.mark.parametrize(
    ("response", "answer", "right"),
    [
        ("3.00", "3", True),
        ("12.345", "12.34", True),
        ("The answer is 7.", "7", True),
        ("45%", "45", True),
        ("1,000", "1000", True),
        ("seven", "7", True),
        ("3.1", "3.2", False),
        ("0.50", "0.5", True),
    ],
)
def test_mathvista_free_form_rules(response, answer, right):
    assert scoring.mathvista_free_form_accuracy(response, answer) == (1.0 if right else 0.0)


def test_mmmu_open_question_matches_numbers_and_phrases():
    assert scoring.mmmu_open_accuracy("The total is 42", "42") == 1.0
    assert scoring.mmmu_open_accuracy("about 41", "42") == 0.0
    assert scoring.mmmu_open_accuracy("it is mitosis", "['mitosis', 'cell division']") == 1.0


CAPTIONS = {
    "1": ("A man riding a horse on a beach.", ["A man rides a horse along the beach.", "A person on a horse."]),
    "2": ("Two dogs play with a frisbee!", ["Two dogs playing frisbee in a park.", "Dogs chase a frisbee."]),
    "3": ("A plate of food, with rice.", ["A plate with rice and vegetables.", "Food on a white plate."]),
    "4": ("The cat's sleeping on a sofa", ["A cat sleeps on a couch.", "A sleeping cat on the sofa."]),
}


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs java")
def test_cider_equals_pycocoevalcap_with_its_ptb_tokenizer():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in refs] for k, (_, refs) in CAPTIONS.items()})
    res = tokenizer.tokenize({k: [{"caption": p}] for k, (p, _) in CAPTIONS.items()})
    expected, _ = Cider().compute_score(gts, res)
    predictions = {k: p for k, (p, _) in CAPTIONS.items()}
    references = {k: refs for k, (_, refs) in CAPTIONS.items()}
    assert scoring.cider(predictions, references) == pytest.approx(expected)


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs java")
def test_java_free_caption_tokens_equal_the_ptb_tokenizer_on_plain_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [p for p, _ in CAPTIONS.values()] + [r for _, refs in CAPTIONS.values() for r in refs]
    tokenized = PTBTokenizer().tokenize({str(i): [{"caption": t}] for i, t in enumerate(texts)})
    for i, text in enumerate(texts):
        assert scoring.simple_caption_tokens(text) == tokenized[str(i)][0], text


def test_cider_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="same image ids"):
        scoring.cider({"1": "a"}, {"2": ["a"]})


@pytest.mark.parametrize(
    ("raw", "cut"),
    [("Paris<|im_end|>junk", "Paris"), ("  42\nbecause ...", "42"), ("A\n\nB", "A"), ("yes", "yes"), ("", "")],
)
def test_first_line_cut(raw, cut):
    assert prompts.first_line(raw) == cut
