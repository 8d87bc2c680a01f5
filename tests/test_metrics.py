"""Downstream metrics and prediction files (vlp.trainer.metrics).

Every expected value below was worked out by hand from the official procedures:
VQA's vqaEval.py (strip; normalize answers and prediction only when the human answers are not
all identical; per annotator min(1, matching others / 3); mean), NLVR2's metrics.py (accuracy;
consistency over identifiers with the pair index blanked), GQA's eval.py (raw string equality),
and scikit-learn's f1_score.
"""

import csv
import json
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from vlp.schemas.answers import normalize_answer, scored_answers
from vlp.trainer.metrics import (exact_match_accuracy, multilabel_f1, nlvr2_scores, nlvr2_sentence,
                                 results_table, vqa_accuracy, vqa_accuracy_from_count, vqa_scores,
                                 write_predictions)


def others(k, tag="other"):
    return [f"{tag}{i}" for i in range(k)]


# ------------------------------------------------------------------------- VQA accuracy

# (prediction, human answers, expected) - the arithmetic is in each comment
VQA_CASES = [
    # all ten identical: NO normalization, neither of the answers nor of the prediction
    ("yes", ["yes"] * 10, 1.0),
    ("Yes", ["yes"] * 10, 0.0),            # would be 1.0 if normalized
    ("yes.", ["yes"] * 10, 0.0),
    ("the dog", ["dog"] * 10, 0.0),
    ("Yes", ["Yes"] * 10, 1.0),
    ("yes", ["Yes"] * 10, 0.0),
    ("  yes\n", ["yes"] * 10, 1.0),         # newline/tab/strip happen always
    ("yes", ["yes"] * 9 + ["yes \t"], 1.0),  # identical after strip -> still no normalization
    ("Yes", ["yes"] * 9 + ["yes \t"], 0.0),
    # not all identical: both sides normalized
    ("Yes", ["yes"] * 9 + ["no"], 1.0),     # 9 'yes': 8 others match -> 1; 'no': 9 match -> 1
    ("no", ["yes"] * 9 + ["no"], 0.3),      # 9 x (1/3) + 1 x 0 = 3 / 10
    # numbers: two -> 2 (both sides); 3 matches: 3 x 2/3 + 7 x 1 = 9 / 10
    ("2", ["two", "two", "2"] + ["3"] * 7, 0.9),
    ("two", ["two", "two", "2"] + ["3"] * 7, 0.9),
    ("Two", ["2"] * 3 + ["two"] + ["3"] * 6, 1.0),   # 4 matches
    ("none", ["0", "zero"] + ["1"] * 8, 0.6),        # 'none' -> 0; 2 matches: 2 x 1/3 + 8 x 2/3 = 6 / 10
    ("eleven", ["11"] * 3 + ["eleven"] + ["12"] * 6, 0.3),  # no rule for 'eleven': 1 match
    # articles dropped
    ("dog", ["a dog", "the dog", "dog"] + ["cat"] * 7, 0.9),
    ("An Apple", ["apple", "apples", "an apple"] + ["pear"] * 7, 0.6),
    # contractions, with the official table's quirks
    ("dont know", ["don't know", "dont know"] + ["no"] * 8, 0.6),
    ("don't know", ["dont know"] * 3 + ["no"] * 7, 0.9),
    ("let's go", ["lets go"] * 4 + ["let's go"] * 2 + ["stop"] * 4, 0.6),  # 'lets' is not in the table
    ("somebody'd", ["somebodyd"] * 3 + ["x"] * 7, 0.9),    # the table maps somebody'd -> somebodyd
    ("Im here", ["i'm here"] * 3 + ["x"] * 7, 0.0),        # capitalised key 'Im' never matches
    # punctuation: a mark next to a space is removed, else it becomes a space
    ("red blue", ["red, blue", "red,blue", "red-blue"] + ["red"] * 7, 0.9),
    ("Red Blue!", ["red, blue", "red,blue", "red-blue", "red blue"] + ["red"] * 6, 1.0),
    ("redblue", ["red-blue"] * 3 + ["red"] * 7, 0.0),
    # a digit-comma-digit anywhere: marks are removed, not spaced
    ("1000", ["1,000", "1,000", "1000"] + ["many"] * 7, 0.9),
    ("1,000", ["1000"] * 2 + ["lots"] * 8, 0.6),
    ("1 000", ["1,000"] * 3 + ["lots"] * 7, 0.0),
    # periods: removed unless a digit follows
    ("2.5", ["2.5"] * 2 + ["2.5."] + ["3"] * 7, 0.9),
    ("usa", ["U.S.A."] * 3 + ["america"] * 7, 0.9),
    # fewer than 10 answers: the same mean over the annotators present
    ("yes", ["yes", "yes", "no"], 4 / 9),   # (1/3 + 1/3 + 2/3) / 3
    ("no", ["yes", "yes", "no"], 2 / 9),    # (1/3 + 1/3 + 0) / 3
    ("yes", ["yes"], 0.0),                  # one annotator: no other annotator can match
    ("yes", ["yes", "yes"], 1 / 3),
]


@pytest.mark.parametrize("prediction,humans,expected", VQA_CASES)
def test_vqa_accuracy_matches_the_official_procedure(prediction, humans, expected):
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("c", range(11))
def test_an_answer_of_c_annotators_scores_min_1_and_0_3_c(c):
    # c annotators gave the answer, the 10 - c others all different answers
    humans = ["yes"] * c + others(10 - c)
    expected = min(Fraction(1), Fraction(3, 10) * c)
    assert vqa_accuracy("yes", humans) == pytest.approx(float(expected), abs=1e-12)
    assert vqa_accuracy_from_count(c) == pytest.approx(float(expected), abs=1e-12)
    # in exact arithmetic: c members see c - 1 matches, 10 - c non-members see c
    exact = (c * min(Fraction(1), Fraction(max(c - 1, 0), 3)) + (10 - c) * min(Fraction(1), Fraction(c, 3))) / 10
    assert exact == expected


def test_vqa_accuracy_needs_an_answer():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ---------------------------------------------------------------------------- VQA scores


def test_vqa_scores_overall_and_per_answer_type():
    pairs = [
        {"question_id": "1", "human_answers": ["yes"] * 9 + ["no"], "answer_type": "yes/no"},
        {"question_id": "2", "human_answers": ["yes"] * 9 + ["no"], "answer_type": "yes/no"},
        {"question_id": "3", "human_answers": ["two", "two", "2"] + ["3"] * 7, "answer_type": "number"},
        {"question_id": "4", "human_answers": ["red"] * 10, "answer_type": "other"},
    ]
    predictions = {"1": "yes", "2": "no", "3": "2", "4": "Red", "99": "ignored"}
    result = vqa_scores(predictions, pairs)
    assert result["n"] == 4
    assert result["accuracy"] == pytest.approx((1.0 + 0.3 + 0.9 + 0.0) / 4)
    assert result["per_answer_type"] == pytest.approx({"yes/no": 0.65, "number": 0.9, "other": 0.0})


def test_vqa_scores_reconstructs_counts_from_soft_scores():
    # scheme "vqa": s = min(1, c/3), float32-rounded as the pair store keeps them
    pairs = [{"question_id": q, "answers": ["2", "3", "many"], "answer_scores": [0.33333334, 0.6666667, 1.0],
              "answer_type": "number"} for q in ("a", "b", "c", "d")]
    result = vqa_scores({"a": "two", "b": "3", "c": "Many", "d": "seven"}, pairs)
    # c=1 -> 0.3, c=2 -> 0.6, s=1 -> 1.0 (see the docstring), absent -> 0
    assert result["accuracy"] == pytest.approx((0.3 + 0.6 + 1.0 + 0.0) / 4)
    # scheme "butd": s = min(1, 0.3 c)
    pairs = [{"question_id": q, "answers": ["yes", "no", "maybe"], "answer_scores": [0.9, 0.6, 0.3]}
             for q in ("a", "b", "c")]
    result = vqa_scores({"a": "yes", "b": "no", "c": "maybe"}, pairs)
    assert result["accuracy"] == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert result["per_answer_type"] == {}
    with pytest.raises(ValueError, match="not a VQA soft score"):
        vqa_scores({"a": "yes"}, [{"question_id": "a", "answers": ["yes"], "answer_scores": [0.5]}])


def test_vqa_scores_reconstruction_is_inexact_only_where_documented():
    # c = 3 under scheme "vqa": stored score 1.0, the official accuracy 0.9
    humans = ["yes"] * 3 + others(7)
    answers, scores = scored_answers(humans, None, "vqa")
    pair = {"question_id": "1", "answers": answers, "answer_scores": scores}
    assert vqa_scores({"1": "yes"}, [pair])["accuracy"] == 1.0
    assert vqa_accuracy("yes", humans) == pytest.approx(0.9)
    # ... the same answers under scheme "butd" are exact
    answers, scores = scored_answers(humans, None, "butd")
    pair = {"question_id": "1", "answers": answers, "answer_scores": scores}
    assert vqa_scores({"1": "yes"}, [pair])["accuracy"] == pytest.approx(0.9)
    # ten identical raw answers: official leaves them raw
    answers, scores = scored_answers(["Yes"] * 10, None, "butd")
    pair = {"question_id": "1", "answers": answers, "answer_scores": scores}
    assert vqa_scores({"1": "yes"}, [pair])["accuracy"] == 1.0
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0


POOL = ["yes", "Yes", "no", "two", "2", "a dog", "dog", "red,blue", "red blue", "dont", "don't", "1,000", "1000"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(POOL), min_size=10, max_size=10), st.sampled_from(POOL + ["cat"]))
def test_vqa_scores_reconstruction_is_exact_for_butd_scores(humans, prediction):
    # exact whenever the ten raw answers are not all identical (the one documented exception)
    if len(set(humans)) == 1:
        return
    answers, scores = scored_answers(humans, None, "butd")
    pair = {"question_id": "7", "answers": answers, "answer_scores": scores}
    assert vqa_scores({"7": prediction}, [pair])["accuracy"] == pytest.approx(vqa_accuracy(prediction, humans))


def test_vqa_scores_needs_every_prediction():
    with pytest.raises(ValueError, match="no prediction for question 2"):
        vqa_scores({"1": "yes"}, [{"question_id": "1", "human_answers": ["yes"] * 10},
                                  {"question_id": "2", "human_answers": ["no"] * 10}])
    with pytest.raises(ValueError):
        vqa_scores({}, [])


# -------------------------------------------------------------------- exact match, NLVR2, F1


def test_exact_match_accuracy_compares_raw_strings():
    gold = {"1": "yes", "2": "yes", "3": "no", "4": "left"}
    result = exact_match_accuracy({"1": "yes", "2": "Yes", "3": "no", "4": "left ", "5": "x"}, gold)
    assert result == {"accuracy": 0.5, "n": 4}
    with pytest.raises(ValueError, match="no prediction for 1 of 4"):
        exact_match_accuracy({"1": "yes", "2": "yes", "3": "no"}, gold)


NLVR2_GOLD = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-1": True, "dev-1-3-1": True, "dev-2-0-0": False,
              "dev-1-0-2": True}
NLVR2_PRED = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-1": True, "dev-1-3-1": False, "dev-2-0-0": False,
              "dev-1-0-2": False}


def test_nlvr2_accuracy_and_consistency():
    # right: 4 of 6; sentences dev-1--0 (both right), dev-1--1 (one wrong), dev-2--0 (right),
    # dev-1--2 (wrong) -> 2 of 4 consistent
    assert nlvr2_sentence("dev-1-3-1") == "dev-1--1"
    assert nlvr2_sentence("nlvr2/test1-77-2-0") == "test1-77--0"
    result = nlvr2_scores(NLVR2_PRED, NLVR2_GOLD)
    assert result == {"accuracy": pytest.approx(4 / 6), "consistency": 0.5, "n": 6}
    prefixed = nlvr2_scores({f"nlvr2/{k}": v for k, v in NLVR2_PRED.items()},
                            {f"nlvr2/{k}": v for k, v in NLVR2_GOLD.items()})
    assert prefixed == result
    # identifiers without the pair field: no consistency
    assert nlvr2_scores({"a": True, "b": True}, {"a": True, "b": False}) == \
        {"accuracy": 0.5, "consistency": None, "n": 2}


def test_multilabel_f1_hand_computed():
    labels = ["Action", "Comedy", "Drama", "Horror"]
    true = [["Action", "Comedy"], ["Action"], ["Drama"]]
    pred = [["Action"], ["Action", "Drama"], ["Drama"]]
    # per label F1 = 2TP / (2TP + FP + FN): Action 4/4 = 1, Comedy 0/1 = 0, Drama 2/3,
    # Horror 0/0 -> zero_division = 0. macro = (1 + 0 + 2/3 + 0) / 4; micro: TP 3, FP 1, FN 1 -> 6/8
    result = multilabel_f1(true, pred, labels)
    assert result == {"micro_f1": pytest.approx(0.75), "macro_f1": pytest.approx(5 / 12), "n": 3}
    with pytest.raises(ValueError, match="not in the label list"):
        multilabel_f1([["Western"]], [[]], labels)
    with pytest.raises(ValueError):
        multilabel_f1(true, pred[:2], labels)
    assert multilabel_f1([[]], [[]], labels) == {"micro_f1": 0.0, "macro_f1": 0.0, "n": 1}


# ---------------------------------------------------------------------- prediction files


def test_vqa_and_vizwiz_files_read_back_as_the_official_evaluation_reads_them(tmp_path):
    annotations = {1: ["yes"] * 9 + ["no"], 2: ["two", "two", "2"] + ["3"] * 7}
    rows = [{"id": "1", "prediction": "yes"}, {"id": "2", "prediction": "2"}]
    path = write_predictions("vqa", rows, tmp_path / "vqa.json")
    results = json.load(open(path))
    assert type(results) == list                                          # loadRes: a list of objects
    assert {r["question_id"] for r in results} == set(annotations)        # ... covering exactly the questions
    assert all(isinstance(r["question_id"], int) and isinstance(r["answer"], str) for r in results)
    scores = {r["question_id"]: vqa_accuracy(r["answer"], annotations[r["question_id"]]) for r in results}
    assert scores == pytest.approx({1: 1.0, 2: 0.9})
    with pytest.raises(ValueError, match="integer"):
        write_predictions("vqa", [{"id": "vqa/x", "prediction": "no"}], tmp_path / "bad.json")
    with pytest.raises(ValueError, match="twice"):
        write_predictions("vqa", rows + rows[:1], tmp_path / "dup.json")

    rows = [{"id": "q1", "image": "VizWiz_val_00000001.jpg", "prediction": "unanswerable"},
            {"id": "VizWiz_val_00000002.jpg", "prediction": "soup"}]
    results = json.load(open(write_predictions("vizwiz", rows, tmp_path / "vizwiz.json")))
    assert results == [{"image": "VizWiz_val_00000001.jpg", "answer": "unanswerable"},
                       {"image": "VizWiz_val_00000002.jpg", "answer": "soup"}]


def test_gqa_file_reads_back_as_gqa_eval_reads_it(tmp_path):
    questions = {"201": {"answer": "yes"}, "202": {"answer": "left"}, "203": {"answer": "red"}}
    rows = [{"id": 201, "prediction": "yes"}, {"id": "202", "prediction": "right"}, {"id": "203", "prediction": "red"}]
    with open(write_predictions("gqa", rows, tmp_path / "gqa.json")) as f:
        predictions = json.load(f)
    predictions = {p["questionId"]: p["prediction"] for p in predictions}
    assert all(qid in predictions for qid in questions)                   # eval.py's completeness check
    official = sum(predictions[q] == a["answer"] for q, a in questions.items()) / len(questions)
    ours = exact_match_accuracy(predictions, {q: a["answer"] for q, a in questions.items()})
    assert ours["accuracy"] == official == pytest.approx(2 / 3)


def test_nlvr2_csv_reads_back_as_the_official_metrics_script_reads_it(tmp_path):
    rows = [{"id": f"nlvr2/{k}", "prediction": v} for k, v in NLVR2_PRED.items()]
    path = write_predictions("nlvr2", rows, tmp_path / "nlvr2.csv")
    # metrics.py: each line stripped and split on ','; identifier, prediction string
    predictions = {}
    for line in open(path).readlines():
        if line:
            fields = line.strip().split(",")
            predictions[fields[0]] = fields[1]
    assert set(predictions.values()) <= {"True", "False"}
    labeled = [{"identifier": k, "label": str(v)} for k, v in NLVR2_GOLD.items()]  # its jsonl labels
    assert len(predictions) == len(labeled)
    correct, consistent = 0, {}
    for example in labeled:
        anon = example["identifier"].split("-")
        anon[2] = ""
        anon = "-".join(anon)
        consistent.setdefault(anon, True)
        if predictions[example["identifier"]].lower() == example["label"].lower():
            correct += 1
        else:
            consistent[anon] = False
    ours = nlvr2_scores(NLVR2_PRED, NLVR2_GOLD)
    assert ours["accuracy"] == correct / len(labeled)
    assert ours["consistency"] == sum(consistent.values()) / len(consistent)
    # the CSV module reads the same two columns and no header
    assert [r[0] for r in csv.reader(open(path))] == list(NLVR2_PRED)
    # predictions as 0/1 or strings are written the same
    again = write_predictions("nlvr2", [{"id": k, "prediction": int(v)} for k, v in NLVR2_PRED.items()],
                              tmp_path / "again.csv")
    assert open(again).read() == open(path).read()


def test_snli_ve_and_mmimdb_json_lines(tmp_path):
    rows = [{"id": "snli_ve/1", "prediction": "entailment"}, {"id": "snli_ve/2", "prediction": "neutral"}]
    lines = [json.loads(x) for x in open(write_predictions("snli_ve", rows, tmp_path / "ve.jsonl"))]
    assert lines == [{"pair_id": "snli_ve/1", "prediction": "entailment"},
                     {"pair_id": "snli_ve/2", "prediction": "neutral"}]
    rows = [{"id": "mmimdb/tt01", "prediction": ["Drama", "Comedy"]}, {"id": "mmimdb/tt02", "prediction": []}]
    lines = [json.loads(x) for x in open(write_predictions("mmimdb", rows, tmp_path / "mm.jsonl"))]
    assert lines == [{"pair_id": "mmimdb/tt01", "prediction": ["Drama", "Comedy"]},
                     {"pair_id": "mmimdb/tt02", "prediction": []}]
    with pytest.raises(ValueError, match="unknown task"):
        write_predictions("vqa2", rows, tmp_path / "x")


# -------------------------------------------------------------------------- results table


def test_results_table():
    results = {"vqa": {"val": {"accuracy": 0.65, "n": 4, "per_answer_type": {"yes/no": 0.5}},
                       "test": {"accuracy": 0.5, "n": 2}},
               "nlvr2": {"accuracy": 2 / 3, "consistency": None, "n": 6}}
    assert results_table(results) == (
        "| task | split | accuracy | n | per_answer_type.yes/no | consistency |\n"
        "|---|---|---:|---:|---:|---:|\n"
        "| vqa | val | 0.6500 | 4 | 0.5000 | – |\n"
        "| vqa | test | 0.5000 | 2 | – | – |\n"
        "| nlvr2 | – | 0.6667 | 6 | – | – |\n")


def test_metrics_module_does_not_import_torch():
    code = "import sys, vlp.trainer.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
