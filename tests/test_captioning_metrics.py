"""Caption metrics: the fast CIDEr-D (SCST's reward) equals pycocoevalcap's Cider on random
corpora and accepts a training document-frequency table; the pycocoevalcap wrapper's
BLEU / ROUGE-L / CIDEr-D, its Java parts (PTB tokenizer, METEOR) and SPICE reported
unavailable."""

from __future__ import annotations

import math
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlp.trainer.captioning.cider import CiderD, DocumentFrequency, corpus_cider_d, simple_tokens
from vlp.trainer.captioning.metrics import caption_metrics

WORDS = ["a", "red", "blue", "circle", "star", "on", "the", "two", "of", "with"]
sentence = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12).map(" ".join)
corpus = st.dictionaries(st.integers(0, 50), st.tuples(sentence, st.lists(sentence.filter(bool), min_size=1,
                                                                          max_size=5)), min_size=2, max_size=12)


@settings(max_examples=100, deadline=None)
@given(corpus)
def test_fast_cider_d_equals_pycocoevalcap_cider_on_random_corpora(data):
    from pycocoevalcap.cider.cider import Cider

    candidates = {k: c for k, (c, _) in data.items()}
    references = {k: refs for k, (_, refs) in data.items()}
    mean, per_image = corpus_cider_d(candidates, references)
    theirs, scores = Cider().compute_score(references, {k: [c] for k, c in candidates.items()})
    assert mean == pytest.approx(float(theirs), abs=1e-12)
    for k, value in zip(references, scores):
        assert per_image[k] == pytest.approx(float(value), abs=1e-12)


def test_cider_d_quirks_are_kept():
    # "length" is the bigram count: one word vs two words differ by one, zero words equal one word
    refs = {1: ["red circle"], 2: ["blue star on the left"], 3: ["two stars"]}
    scorer = CiderD(refs)
    assert scorer.score("red circle", 1) == pytest.approx(10.0 * 2 / 4)  # n=1,2 match; n=3,4 have no n-grams
    assert scorer.score("green square", 1) == 0.0
    assert scorer.score("", 1) == 0.0


def test_training_document_frequencies_change_the_reward():
    train = [["a red circle"], ["a blue circle"], ["a red star"], ["two hearts"]]
    df = DocumentFrequency.from_references(train)
    assert df.num_documents == 4 and df.counts[("a",)] == 3 and df.counts[("circle",)] == 2
    assert df.counts[("a", "red")] == 2 and ("hearts",) in df.counts
    assert DocumentFrequency.from_dict(df.to_dict()).counts == df.counts
    refs = {"x": ["a red circle"]}
    with_train_df = CiderD(refs, df)
    alone = CiderD(refs)  # df from its own (single image) references: log(1) = 0, every weight 0
    assert alone.score("a red circle", "x") == 0.0
    # identical caption: clipped cosine 1 for n = 1..3 (no 4-gram): 10 * 3 / 4
    assert with_train_df.score("a red circle", "x") == pytest.approx(7.5)
    # the rare word scores above the common one: "red" (df 2) vs "a" (df 3)
    assert with_train_df.score("red", "x") > with_train_df.score("a", "x") > 0
    weight = math.log(4) - math.log(2)  # "red": tf 1 * (log 4 - log df 2)
    assert with_train_df._refs("x")[0].vec[0][("red",)] == pytest.approx(weight)


def test_simple_tokens_match_the_coco_punctuation_filter():
    assert simple_tokens("A red circle, next to two STARS.") == ["a", "red", "circle", "next", "to", "two", "stars"]
    assert simple_tokens("") == []


def test_wrapper_scores_equal_pycocoevalcap_and_say_what_is_unavailable():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predictions = {1: "A red circle on a blue background.", 2: "two stars", 3: "a heart"}
    references = {1: ["A red circle.", "a red disc on blue"], 2: ["Two yellow stars.", "two stars and a heart"],
                  3: ["A large heart.", "one heart shape"]}
    out = caption_metrics(predictions, references, use_java=False)
    gts = {k: [" ".join(simple_tokens(r)) for r in v] for k, v in references.items()}
    res = {k: [" ".join(simple_tokens(v))] for k, v in predictions.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [out[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert out["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert out["CIDEr-D"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert out["tokenizer"] == "simple" and out["n"] == 3
    assert "METEOR" not in out and "Java" in out["unavailable"]["METEOR"]
    assert "SPICE" not in out and "download" in out["unavailable"]["SPICE"]
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({9: "a star"}, references, use_java=False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="needs java (PTB tokenizer, METEOR)")
def test_with_java_the_ptb_tokenizer_and_meteor_run():
    predictions = {1: "A red circle on a blue background.", 2: "two stars"}
    references = {1: ["A red circle.", "a red disc on blue"], 2: ["Two yellow stars.", "two stars and a heart"]}
    out = caption_metrics(predictions, references)
    assert out["tokenizer"] == "ptb"
    assert 0 < out["METEOR"] < 1 and "METEOR" not in out["unavailable"]
    # the PTB tokenizer and the Python stand-in agree on plain ASCII captions
    simple = caption_metrics(predictions, references, use_java=False, meteor=False)
    assert out["CIDEr-D"] == pytest.approx(simple["CIDEr-D"]) and out["BLEU-4"] == pytest.approx(simple["BLEU-4"])


def test_held_out_cc_images_have_coco_style_truth_captions(tmp_path):
    """The synthetic world's CC rows describe its own images: every held-out (val/test) image
    has one CC alt text and five COCO-style truth captions, so CC and CCG texts can be scored
    against the same truth; the web-style CC text is far from it."""
    import json

    from vlp.synthetic import generate

    generate(tmp_path, 20, seed=2, split_fractions=(0.5, 0.25, 0.25), overwrite=True, web=False)
    splits = json.loads((tmp_path / "splits.json").read_text())
    held_out = {str(i) for i in splits["val"] + splits["test"]}
    cc = {}
    for line in (tmp_path / "cc" / "train.tsv").read_text().splitlines():
        text, url = line.split("\t")
        name = url.rsplit("/", 1)[-1][:-4]
        if name.isdigit():
            cc[name] = text
    truth: dict = {}
    for ann in json.loads((tmp_path / "annotations" / "captions_val.json").read_text())["annotations"]:
        truth.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    assert set(truth) == held_out and held_out <= set(cc)
    assert all(len(truth[i]) == 5 for i in held_out)
    ids = sorted(held_out)
    refs = {i: [" ".join(simple_tokens(t)) for t in truth[i]] for i in ids}
    web, _ = corpus_cider_d({i: " ".join(simple_tokens(cc[i])) for i in ids}, refs)
    own, _ = corpus_cider_d({i: refs[i][0] for i in ids}, {i: refs[i][1:] for i in ids})
    # A COCO-style caption is much closer to the others than the CC text (wide world, seed 2:
    # 0.40 against 0.75; single-object scenes bring the short web text closer than the
    # classic world's 0.3).
    assert own > 0.5 and web < 0.6 * own
