"""NVLM's two scoring profiles, per benchmark, side by side.

`nvlm` is Megatron-LM `NVLM-1.0`'s formulas (examples/multimodal/evaluate_*.py), the ones behind the card's Megatron
row; `standard` is each benchmark's official scorer (what lmms-eval, VLMEvalKit and the leaderboards report). They
differ on a few well-known cases (k of 10 VQA annotators agreeing, signs and percentages in ChartQA, OCRBench items
with several matching answers); docs/evaluation.md lists them. Every function takes the model's cut answer and the
record's ground truth and returns a float in [0, 1] (OCRBench's `nvlm` profile may give 2 for one item, as Megatron
counts each matching answer).

The VQA answer normalisation (punctuation, number words, articles, contractions) is the official VQA evaluation's,
taken from lmms-eval's `EvalAIAnswerProcessor` so that both profiles and lmms-eval's own tasks normalise alike.
"""

from __future__ import annotations

import ast
import random
import re
import zlib
from collections.abc import Sequence

PROFILES = ("nvlm", "standard")
RELAXED_TOLERANCE = 0.05  # ChartQA: a number within 5% of the answer is right
ANLS_THRESHOLD = 0.5


def _vqa_processor():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    return EvalAIAnswerProcessor()


_PROCESSOR = None


def vqa_normalize(text: str) -> str:
    """The official VQA normalisation: newlines and tabs to spaces, punctuation, number words to digits, articles
    dropped, contractions restored."""
    global _PROCESSOR
    if _PROCESSOR is None:
        _PROCESSOR = _vqa_processor()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _PROCESSOR.process_digit_article(_PROCESSOR.process_punctuation(text))


# ------------------------------------------------------------------------------------------------------------
# VQAv2, TextVQA
# ------------------------------------------------------------------------------------------------------------


def vqa_accuracy_nvlm(prediction: str, answers: Sequence[str]) -> float:
    """Megatron: both sides always normalised, `min(1, matches / 3)` over the (10) answers."""
    predicted = vqa_normalize(prediction)
    matches = sum(predicted == vqa_normalize(answer) for answer in answers)
    return min(1.0, matches / 3.0)


def vqa_accuracy_standard(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy: the mean over the answers of `min(1, matches among the other answers / 3)`
    (leave one out); answers and prediction are normalised only when the annotators disagree."""
    predicted = prediction.replace("\n", " ").replace("\t", " ").strip()
    truths = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in answers]
    if len(set(truths)) > 1:
        truths = [vqa_normalize(answer) for answer in truths]
        predicted = vqa_normalize(predicted)
    scores = []
    for left_out in range(len(truths)):
        others = truths[:left_out] + truths[left_out + 1 :]
        scores.append(min(1.0, sum(other == predicted for other in others) / 3.0))
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------------------
# ChartQA
# ------------------------------------------------------------------------------------------------------------


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy_nvlm(prediction: str, answers: Sequence[str]) -> float:
    """Megatron: both sides VQA-normalised (so `-` becomes a space: signs are lost) and `%` stripped; a number is
    right within 5% of the answer (`|p - t| <= 0.05 |t|`, so 0 needs 0), anything else needs an exact match."""
    predicted = vqa_normalize(prediction).replace("%", "").strip()
    for answer in answers:
        truth = vqa_normalize(answer).replace("%", "").strip()
        p, t = _float_or_none(predicted), _float_or_none(truth)
        if p is not None and t is not None:
            if abs(p - t) <= RELAXED_TOLERANCE * abs(t):
                return 1.0
        elif predicted == truth:
            return 1.0
    return 0.0


def _pix2struct_float(text: str) -> float | None:
    if text.endswith("%"):
        value = _float_or_none(text[:-1])
        return None if value is None else value / 100.0
    return _float_or_none(text)


def relaxed_accuracy_standard(prediction: str, answers: Sequence[str]) -> float:
    """pix2struct's relaxed accuracy (as lmms-eval and VLMEvalKit): `%` divides by 100, `|p - t| / |t| <= 0.05`,
    a zero or non-numeric answer needs a case-insensitive string match."""
    predicted = prediction.strip()
    for answer in answers:
        truth = answer.strip()
        p, t = _pix2struct_float(predicted), _pix2struct_float(truth)
        if p is not None and t:
            if abs(p - t) / abs(t) <= RELAXED_TOLERANCE:
                return 1.0
        elif predicted.lower() == truth.lower():
            return 1.0
    return 0.0


# ------------------------------------------------------------------------------------------------------------
# DocVQA
# ------------------------------------------------------------------------------------------------------------


def anls(prediction: str, answers: Sequence[str]) -> float:
    """ANLS (threshold 0.5, lower case, whitespace collapsed, best over the answers) by the `anls` package, the
    scorer NVIDIA's own evaluation pins; both profiles use it."""
    from anls import anls_score

    return float(anls_score(prediction, list(answers), threshold=ANLS_THRESHOLD))


# ------------------------------------------------------------------------------------------------------------
# OCRBench
# ------------------------------------------------------------------------------------------------------------

OCRBENCH_CATEGORIES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)


def _ocrbench_matches(prediction: str, answers: Sequence[str], dataset: str) -> int:
    if dataset == "HME100k":  # formulas: spaces removed, case kept
        predicted = prediction.strip().replace("\n", " ").replace(" ", "")
        return sum(answer.strip().replace("\n", " ").replace(" ", "") in predicted for answer in answers)
    predicted = prediction.lower().strip().replace("\n", " ")
    return sum(answer.lower().strip().replace("\n", " ") in predicted for answer in answers)


def ocrbench_nvlm(prediction: str, answers: Sequence[str], dataset: str) -> float:
    """Megatron: one point per ground truth found in the answer (an item with two matching answers counts 2)."""
    return float(_ocrbench_matches(prediction, answers, dataset))


def ocrbench_standard(prediction: str, answers: Sequence[str], dataset: str) -> float:
    """OCRBench's example.py: one point when any ground truth is a case-insensitive substring of the answer
    (HME100k: spaces removed, case-sensitive)."""
    return 1.0 if _ocrbench_matches(prediction, answers, dataset) else 0.0


# ------------------------------------------------------------------------------------------------------------
# Multiple choice (MMMU, MMMU-Pro, MMBench, MathVista, AI2D, RealWorldQA) and MMMU's open questions
# ------------------------------------------------------------------------------------------------------------


def letters(count: int) -> list[str]:
    return [chr(ord("A") + index) for index in range(count)]


def parse_choice(response: str, options: Sequence[str], seed_key: str) -> str:
    """The MMMU repository's `parse_multi_choice_response` (as lmms-eval ships it): a bracketed letter, then a bare
    letter, then the option's text; when nothing matches it picks a random letter, here from a generator seeded by
    `seed_key` (the record's id), so that a run is reproducible and one sample's fallback never shifts another's."""
    from lmms_eval.tasks.mmmu.utils import parse_multi_choice_response

    choices = letters(len(options))
    index2ans = dict(zip(choices, options, strict=True))
    state = random.getstate()
    random.seed(zlib.crc32(seed_key.encode("utf-8")))
    try:
        return parse_multi_choice_response(response, choices, index2ans)
    finally:
        random.setstate(state)


def multiple_choice_accuracy(response: str, options: Sequence[str], answer: str, seed_key: str) -> float:
    return 1.0 if parse_choice(response, options, seed_key) == answer.strip() else 0.0


def mmmu_open_accuracy(response: str, answer: str | Sequence[str]) -> float:
    """The MMMU repository's open-question scoring: parse numbers and key phrases, then match them to the answer."""
    from lmms_eval.tasks.mmmu.utils import eval_open, parse_open_response

    gold = list(answer) if not isinstance(answer, str) else _maybe_list(answer)
    return 1.0 if eval_open(gold, parse_open_response(response)) else 0.0


def _maybe_list(answer: str) -> str | list[str]:
    """MMMU stores several acceptable open answers as the text of a Python list."""
    if answer.startswith("[") and answer.endswith("]"):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(value, list):
            return [str(item) for item in value]
    return answer


def letter_exact_match(prediction: str, letter: str) -> float:
    """AI2D and RealWorldQA in Megatron: the VQA-normalised answer equals the normalised letter."""
    return 1.0 if vqa_normalize(prediction) == vqa_normalize(letter) else 0.0


# ------------------------------------------------------------------------------------------------------------
# MathVista (rule-based; the GPT-judged variant is lmms-eval's own `mathvista_testmini`)
# ------------------------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)", re.IGNORECASE)


def _cap_decimals(text: str) -> str:
    """`3.00` -> `3`, `12.345` -> `12.34`, `0.5` -> `0.5`: at most two decimals (cut, not rounded), no trailing
    zeros, so that equal numbers compare equal as strings."""
    if not re.fullmatch(r"-?[0-9]+\.[0-9]+", text):
        return text
    whole, decimals = text.split(".")
    decimals = decimals[:2].rstrip("0")
    return f"{whole}.{decimals}" if decimals else whole


def mathvista_free_form_answer(response: str) -> str:
    """The number after `answer is` when there is one, else the whole answer; `%` and a trailing `.` dropped, the
    VQA normalisation, decimals capped at two."""
    found = _ANSWER_IS.search(response)
    text = found.group(1).replace(",", "") if found else response
    text = text.strip().replace("%", "").rstrip(".").strip()
    return _cap_decimals(vqa_normalize(text))


def mathvista_free_form_accuracy(response: str, answer: str) -> float:
    return 1.0 if mathvista_free_form_answer(response) == _cap_decimals(vqa_normalize(str(answer))) else 0.0


# ------------------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------------------


def cider(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> float:
    """Corpus CIDEr-D (x100 is the usual report; this returns pycocoevalcap's raw score) of `predictions` against
    `references`, both keyed by image id, through pycocoevalcap. Text is tokenised by pycocoevalcap's PTB tokenizer
    (Stanford CoreNLP, needs `java`) when Java is installed, else by `simple_caption_tokens`, which does what it
    does for plain English captions (lower case, punctuation dropped)."""
    import shutil

    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same image ids")
    if not predictions:
        raise ValueError("CIDEr needs at least one caption")
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({key: [{"caption": ref} for ref in refs] for key, refs in references.items()})
        res = tokenizer.tokenize({key: [{"caption": text}] for key, text in predictions.items()})
    else:
        gts = {key: [simple_caption_tokens(ref) for ref in refs] for key, refs in references.items()}
        res = {key: [simple_caption_tokens(text)] for key, text in predictions.items()}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


_PTB_PUNCTUATION = re.compile(r"[^\w\s']|'(?!\w)|(?<!\w)'")


def simple_caption_tokens(text: str) -> str:
    """Lower case, punctuation removed, `'s`-style clitics split off, whitespace collapsed: the PTB tokenizer's
    result for plain English captions, without Java."""
    text = _PTB_PUNCTUATION.sub(" ", text.lower())
    text = re.sub(r"(\w)('\w+)", r"\1 \2", text)
    return " ".join(text.split())
