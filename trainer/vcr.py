"""VCR finetuning (VL-BERT / UNITER recipe): four candidates per question, one score each.

Pairs of kind ``vcr`` (``vlp-build import-vcr``): a question with four answers and four
rationales as word lists in which every object tag became the object's label words linked
to its region (the regions are the metadata's given boxes: ``vlp-extract --boxes
OUT/gt_boxes.jsonl``). A linked word gets its region's spatial embedding, as LAMP's label
tokens (the encoder's ``token_regions``), and, as VL-BERT's tagged words, its region's
feature embedding (the encoder's feature projection, added by a forward hook on the word
embeddings; single-stream encoder).

* Q->A: candidate c = ``[CLS] question [SEP] answer_c [SEP]``;
* QA->R: candidate c = ``[CLS] question answer [SEP] rationale_c [SEP]`` with the right
  answer (the standard QA->R, conditioned on the gold answer).

Each candidate is encoded with the image's regions, scored by the head on the pooled
[CLS] output (one logit), and the loss is the cross-entropy over the four. ``setting``:
``joint`` (default: every question gives one Q->A and one QA->R example, one model; the
metrics are Q->A, QA->R and Q->AR = both right, the main one), ``q_a`` or ``qa_r`` (one
sub-task; its accuracy is the main metric). ``roi_mask_prob`` > 0 adds VL-BERT's masked
RoI classification: that share of the regions is zeroed (the same regions for the four
candidates) and their detector class predicted from their output (CE; needs
``objects_id`` in the store).

The four candidates travel through the shared collate as one concatenated token row with
their lengths in ``label`` ([gold, mode, len_0 .. len_3]); :meth:`VCR.prepare` splits them
into 4 rows per example and repeats the regions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp.schemas.pairs import VCR_CHOICES
from vlp.trainer.data import IGNORE, PairDataset
from vlp.trainer.downstream import DownstreamTask
from vlp.trainer.heads import build_head
from vlp.trainer.tasks import REGION_FIELDS, mask_regions

VCR_SETTINGS = ("joint", "q_a", "qa_r")
MODES = ("q_a", "qa_r")


class VCRDataset(PairDataset):
    """PairDataset over vcr pairs: example i is (pair, mode); modes as ``modes`` (QA->R only
    for pairs with a known answer)."""

    def __init__(self, pairs, features, tokenizer, *, modes=MODES, **kwargs):
        super().__init__(pairs, features, tokenizer, **kwargs)
        answer_labels = pairs.column("answer_label")
        indices, kinds = [], []
        for index in self.indices.tolist():
            for mode in modes:
                if mode == "qa_r" and (answer_labels[index] is None or answer_labels[index] < 0):
                    continue
                indices.append(index)
                kinds.append(MODES.index(mode))
        self.indices = np.asarray(indices, dtype=np.int64)
        self.modes = np.asarray(kinds, dtype=np.int64)
        self._lengths = None

    def text_lengths(self) -> np.ndarray:
        if self._lengths is None:  # the longest candidate's word count + the question's: bucketing only
            rows = {}
            for i in set(self.indices.tolist()):
                pair = self.pairs[i]
                q = len(pair.get("question_words") or [])
                a = max((len(w) for w in pair.get("answer_words") or [[]]), default=0)
                r = max((len(w) for w in pair.get("rationale_words") or [[]]), default=0)
                rows[i] = (q + a + 3, q + a + r + 3)
            self._lengths = np.array([min(self.max_text_len, rows[i][m]) for i, m in zip(self.indices, self.modes)],
                                     dtype=np.int64)
        return self._lengths

    def _candidate(self, first, second) -> tuple[list, list]:
        words_a, regions_a = first
        words_b, regions_b = second
        words_a, words_b = list(words_a) or ["."], list(words_b) or ["."]
        regions_a, regions_b = list(regions_a) or [-1], list(regions_b) or [-1]
        enc = self.tokenizer(words_a, words_b, is_split_into_words=True, truncation=True,
                             max_length=self.max_text_len)
        links = []
        for word, sequence in zip(enc.word_ids(), enc.sequence_ids()):
            links.append(-1 if word is None else (regions_a if sequence == 0 else regions_b)[word])
        return list(enc["input_ids"]), links

    def example(self, i: int, epoch: int = 0) -> dict:
        index, mode = int(self.indices[i]), int(self.modes[i])
        pair = self.pairs[index]
        record = self.features.get(pair["image_id"])
        question = (pair.get("question_words") or [], pair.get("question_regions") or [])
        if mode == 0:
            first = question
            seconds = list(zip(pair["answer_words"], pair["answer_regions"]))
            gold = pair.get("answer_label", -1)
        else:
            a = int(pair["answer_label"])
            first = (list(question[0]) + list(pair["answer_words"][a]), list(question[1]) + list(pair["answer_regions"][a]))
            seconds = list(zip(pair["rationale_words"], pair["rationale_regions"]))
            gold = pair.get("rationale_label", -1)
        ids, links, lengths = [], [], []
        for second in seconds:
            candidate_ids, candidate_links = self._candidate(first, second)
            ids += candidate_ids
            links += candidate_links
            lengths.append(len(candidate_ids))
        example = {"index": i, "pair_id": pair["pair_id"], "image_id": pair["image_id"], "text": pair.get("text") or "",
                   "input_ids": torch.tensor(ids, dtype=torch.long), "token_regions": torch.tensor(links, dtype=torch.long)}
        example.update(self._regions(pair["image_id"], record))
        n = example["region_features"].shape[0]
        example["token_regions"][example["token_regions"] >= n] = -1
        gold = IGNORE if gold is None or gold < 0 else int(gold)
        example["label"] = torch.tensor([gold, mode] + lengths, dtype=torch.long)
        return example


class VCR(DownstreamTask):
    name, key, pair_kind = "VCR", "vcr", "vcr"
    losses = ("ce",)
    fixed_labels = tuple("ABCD")  # the four candidates

    def __init__(self, labels=fixed_labels, *, roi_mask_prob: float = 0.0, **kwargs):
        kwargs.setdefault("setting", "joint")
        super().__init__(labels, **kwargs)
        if self.setting not in VCR_SETTINGS:
            raise ValueError(f"task vcr: setting must be one of {', '.join(VCR_SETTINGS)}, got {self.setting!r}")
        if not 0.0 <= float(roi_mask_prob) < 1.0:
            raise ValueError(f"task vcr: roi_mask_prob must be in [0, 1), got {roi_mask_prob!r}")
        self.roi_mask_prob = float(roi_mask_prob)
        self.main_metric = "q_ar" if self.setting == "joint" else self.setting

    @classmethod
    def from_config(cls, labels, spec) -> "VCR":
        return cls(labels, head=spec.head, loss=spec.loss, setting=spec.setting,
                   roi_mask_prob=getattr(spec, "roi_mask_prob", None) or 0.0)

    def modes(self) -> tuple:
        return MODES if self.setting == "joint" else (self.setting,)

    def dataset(self, pairs, features, tokenizer, **kwargs) -> VCRDataset:
        kwargs.pop("targets", None)
        kwargs.pop("second_image", None)
        return VCRDataset(pairs, features, tokenizer, modes=self.modes(), **kwargs)

    def build_head(self, encoder, ctx):
        self._links = None
        if hasattr(encoder, "feature_proj") and hasattr(encoder, "word_embeddings"):
            encoder.word_embeddings.register_forward_hook(self._add_region_features)
            self._feature_proj = [encoder.feature_proj]  # a list: not a submodule of the task's head
        heads = {"score": build_head(self.head_name, encoder.hidden_size, 1)}
        if self.roi_mask_prob:
            from vlp.schemas.vocab import NUM_OBJECTS

            heads["roi"] = nn.Linear(encoder.hidden_size, NUM_OBJECTS)
        return nn.ModuleDict(heads)

    def _add_region_features(self, module, inputs, output):
        """VL-BERT's tagged words: a word linked to a region also gets that region's feature
        embedding (the encoder's own projection), besides LAMP's spatial one."""
        links = self._links
        if links is None or output.dim() != 3 or tuple(output.shape[:2]) != tuple(links[0].shape):
            return None
        token_regions, features = links
        gather = token_regions.clamp(min=0).unsqueeze(-1).expand(-1, -1, features.shape[-1])
        linked = self._feature_proj[0](torch.gather(features, 1, gather).to(output.dtype))
        return output + linked * (token_regions >= 0).unsqueeze(-1).to(output.dtype)

    def target(self, pair):  # VCRDataset sets the label itself
        raise NotImplementedError

    def prepare(self, batch, generator, ctx):
        label = batch.pop("label")
        lengths = label[:, 2:2 + VCR_CHOICES]
        rows, width = label.shape[0], int(lengths.max())
        device = batch["input_ids"].device
        ids = torch.full((rows * VCR_CHOICES, width), ctx.pad_id, dtype=torch.long, device=device)
        links = torch.full((rows * VCR_CHOICES, width), -1, dtype=torch.long, device=device)
        for b in range(rows):
            start = 0
            for c in range(VCR_CHOICES):
                n = int(lengths[b, c])
                ids[b * VCR_CHOICES + c, :n] = batch["input_ids"][b, start:start + n]
                links[b * VCR_CHOICES + c, :n] = batch["token_regions"][b, start:start + n]
                start += n
        batch["input_ids"], batch["token_regions"] = ids, links
        batch["text_mask"] = torch.arange(width, device=device)[None, :] < lengths.reshape(-1, 1).to(device)
        if self.roi_mask_prob and generator is not None:
            batch["region_targets"] = batch["region_features"]
            batch["region_features"], batch["region_masked"], _ = mask_regions(
                batch["region_features"], batch["region_mask"], generator, self.roi_mask_prob)
        for key in REGION_FIELDS + ("image_feature", "region_masked"):
            if key in batch:
                batch[key] = batch[key].repeat_interleave(VCR_CHOICES, 0)
        batch["vcr_gold"], batch["vcr_mode"] = label[:, 0], label[:, 1]
        self._links = (batch["token_regions"], batch["region_features"])  # read by the word-embedding hook

    def logits(self, out, batch, head) -> torch.Tensor:
        self._links = None
        return head["score"](out.pooled).float().view(-1, VCR_CHOICES)

    def loss(self, out, batch, head, ctx):
        logits = self.logits(out, batch, head)
        gold = batch["vcr_gold"]
        ok = gold != IGNORE
        loss = logits.sum() * 0.0 if not ok.any() else F.cross_entropy(logits[ok], gold[ok])
        metrics: dict = {"task_acc": None}
        if ok.any():
            metrics = {"task_acc": (logits[ok].argmax(-1) == gold[ok]).float().mean().item(), "task_n": int(ok.sum())}
        masked = batch.get("region_masked")
        if masked is not None and "objects_id" in batch:
            chosen = masked & (batch["objects_id"] != IGNORE)
            if chosen.any():
                roi_logits = head["roi"](out.regions[chosen]).float()
                target = batch["objects_id"][chosen]
                loss = loss + F.cross_entropy(roi_logits, target)
                metrics["vcr_roi_acc"] = (roi_logits.argmax(-1) == target).float().mean().item()
                metrics["vcr_roi_n"] = int(chosen.sum())
        return loss, metrics

    def predict_batch(self, logits, batch) -> list:
        modes = batch["label"][:, 1].tolist() if "label" in batch else batch["vcr_mode"].tolist()
        return [{"mode": MODES[int(m)], "choice": int(k)} for m, k in zip(modes, logits.argmax(-1).tolist())]

    def has_gold(self, pair) -> bool:
        return (pair.get("answer_label") if pair.get("answer_label") is not None else -1) >= 0

    def score(self, pairs, predictions) -> dict:
        from vlp.trainer.metrics import vcr_scores

        answers, rationales = {}, {}
        gold_answers, gold_rationales = {}, {}
        for pair, prediction in zip(pairs, predictions):
            if not self.has_gold(pair):
                continue
            key = pair["pair_id"]
            if prediction["mode"] == "q_a":
                answers[key] = prediction["choice"]
                gold_answers[key] = int(pair["answer_label"])
            elif (pair.get("rationale_label") if pair.get("rationale_label") is not None else -1) >= 0:
                rationales[key] = prediction["choice"]
                gold_rationales[key] = int(pair["rationale_label"])
        if not answers and not rationales:
            return {"n": 0}
        return vcr_scores(answers, rationales, gold_answers, gold_rationales)

    def prediction_row(self, pair, prediction) -> dict:
        return {"id": f"{pair['pair_id']}#{prediction['mode']}", "prediction": {"choice": prediction["choice"]}}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "roi_mask_prob": self.roi_mask_prob}

