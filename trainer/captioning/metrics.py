"""Caption metrics with the COCO caption evaluation's definitions: ``pycocoevalcap``.

==========  ==================================  ==================================================
metric      source                              needs
==========  ==================================  ==================================================
BLEU-1..4   pycocoevalcap.bleu (Papineni)       pure Python
METEOR      pycocoevalcap.meteor (meteor-1.5)   Java (``java`` on PATH)
ROUGE-L     pycocoevalcap.rouge                 pure Python
CIDEr-D     pycocoevalcap.cider                 pure Python (the CIDEr-D variant, see cider.py)
SPICE       pycocoevalcap.spice                 Java + Stanford CoreNLP models downloaded at run
                                                time: reported unavailable (offline), never faked
==========  ==================================  ==================================================

Tokenization is the COCO evaluation's: Stanford's PTB tokenizer (``PTBTokenizer``, Java)
lower-cases and splits, then its punctuation tokens are dropped. Without Java, a Python
stand-in (:func:`~vlp.trainer.captioning.cider.simple_tokens`: lower-cased words, punctuation
dropped) is used, and the result says so (``tokenizer: simple``); for plain ASCII captions
the two agree. :func:`caption_metrics` returns the scores (BLEU etc. as fractions, CIDEr-D
on its usual 0-10 scale) plus ``tokenizer`` and ``unavailable`` (metric -> reason).
"""

from __future__ import annotations

import logging
import shutil
from typing import Optional

from vlp.trainer.captioning.cider import simple_tokens

log = logging.getLogger(__name__)

SPICE_UNAVAILABLE = ("SPICE needs Stanford CoreNLP models that pycocoevalcap downloads at run time; "
                     "not available offline")


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize(captions: dict, *, use_java: Optional[bool] = None) -> tuple[dict, str]:
    """``{id: [text, ...]}`` -> ``({id: [tokenized text, ...]}, tokenizer name)``."""
    use_java = java_available() if use_java is None else use_java
    if use_java:
        try:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            keyed = {k: [{"caption": c} for c in v] for k, v in captions.items()}
            out = PTBTokenizer().tokenize(keyed)
            if all(k in out for k in captions):
                return out, "ptb"
        except Exception as error:  # the jar could not run: fall back, and say so
            log.warning("PTB tokenizer failed (%s); using the Python tokenizer", error)
    return {k: [" ".join(simple_tokens(c)) for c in v] for k, v in captions.items()}, "simple"


def caption_metrics(predictions: dict, references: dict, *, use_java: Optional[bool] = None,
                    meteor: bool = True) -> dict:
    """Scores of ``predictions`` (``{id: text}``) against ``references`` (``{id: [text, ...]}``)
    over the ids of ``predictions`` (each must have references)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    use_java = java_available() if use_java is None else use_java
    ids = [k for k in predictions]
    missing = [k for k in ids if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) have no reference captions, e.g. {missing[0]!r}")
    if not ids:
        return {"n": 0}
    gts, tokenizer = tokenize({k: list(references[k]) for k in ids}, use_java=use_java)
    res, _ = tokenize({k: [predictions[k]] for k in ids}, use_java=use_java)
    out: dict = {"n": len(ids), "tokenizer": tokenizer}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(value)
    unavailable = {"SPICE": SPICE_UNAVAILABLE}
    if meteor and use_java:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
            del scorer
        except Exception as error:
            unavailable["METEOR"] = f"METEOR (Java) failed: {error}"
    elif meteor:
        unavailable["METEOR"] = "METEOR needs Java (no java on PATH)"
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0]) if len(ids) > 1 else 0.0
    out["unavailable"] = unavailable
    return out


def metric_line(metrics: dict) -> str:
    keys = ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
    return f"{shown} (n {metrics.get('n', 0)}, tokenizer {metrics.get('tokenizer', '-')})"
