"""VQA answer normalization against the official evaluation (vqaEval.py of the VQA API).

Each expected output below was worked out by hand from the official code: the answer-level
replace of newline/tab and strip, processPunctuation (the 21 marks in order, each tested on
the original answer; periods not followed by a digit removed, at most 32), then
processDigitArticle (lower case, number words, articles, the published contraction table).
"""

import pytest

from vlp.schemas.answers import CONTRACTIONS, normalize_answer

CASES = {
    # the contraction table as published, not a generated one
    "lets": "lets", "shes": "shes", "let's": "let's", "she's": "she's", "Shes": "shes",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'allll": "y'all'll", "yall": "y'all",
    "somebody'd": "somebodyd",            # the table maps it backwards
    "Im": "im", "Ive": "ive", "I'dve": "i'dve",  # capitalised keys never meet a lower-cased word
    "im": "im", "ill": "ill", "wed": "wed", "well": "well", "its": "its", "id": "id", "hell": "hell",
    "dont": "don't", "isnt": "isn't", "hed": "he'd", "twas": "'twas", "oclock": "o'clock",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "couldntve": "couldntve",
    "whove": "who've", "weve": "we've", "wheres": "where's", "whats up": "what's up",
    "cant see": "can't see", "ow's'at": "'ow's'at",
    # number words and articles
    "two": "2", "Ten": "10", "eleven": "eleven", "none": "0", "None of the above": "0 of above",
    "the one": "1", "An Apple": "apple", "a": "", "a lot": "lot", "there is an apple": "there is apple",
    # punctuation: removed next to a space, else a space
    "red,blue": "red blue", "red, blue": "red blue", "x - y": "x y", "no-way": "no way",
    "left/right": "left right", "hot dog!": "hot dog", "what?": "what", "(yes)": "yes",
    "@home": "home", "a_b": "b", "\"quoted\"": "quoted", "50%": "50%", "10:30": "10:30",
    "don't know": "don't know", "it's": "it's",
    # a digit-comma-digit anywhere: every mark is removed, not spaced
    "1,000": "1000", "1,000 dogs-cats": "1000 dogscats", "3, 4": "3 4", "2,5 (ish)": "25 ish",
    # periods: kept before a digit only
    "2.5": "2.5", "1.5.2": "1.5.2", "2. 5": "2 5", "Yes.": "yes", "U.S.A.": "usa", "end..": "end",
    ".5": ".5", "mr. smith": "mr smith", "." * 40 + "x": "." * 8 + "x",  # at most 32 removed
    # whitespace
    "\tYes\n": "yes", "yes\tno": "yes no", "  none ": "0", "two\ndogs": "2 dogs",
}


@pytest.mark.parametrize("answer", sorted(CASES))
def test_normalize_answer_matches_the_official_evaluation(answer):
    assert normalize_answer(answer) == CASES[answer]


def test_the_contraction_table_is_the_published_one():
    assert len(CONTRACTIONS) == 120
    assert "lets" not in CONTRACTIONS and "shes" not in CONTRACTIONS and "ive" not in CONTRACTIONS
    assert CONTRACTIONS["somebody'd"] == "somebodyd" and CONTRACTIONS["Id've"] == "I'd've"
    assert all("\u2019" not in k + v for k, v in CONTRACTIONS.items())  # plain apostrophes
