"""Trainer data: examples, geometry, LAMP region mapping, collate, bucketing."""

from __future__ import annotations

import pickle

import numpy as np

import pytest
import torch

from vlp.schemas.pairs import PairStore, PairStoreWriter
from vlp.trainer.data import (IGNORE, Collator, LengthBucketBatchSampler, PairDataset,
                              attach_label_tokens, box_geometry, collate, load_tokenizer)
from vlp.trainer.toydata import tiny_feature_store, write_vocab


@pytest.fixture(scope="module")
def tokenizer(minilm_checkpoint):
    path = minilm_checkpoint
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    features = tiny_feature_store(root / "features", [f"img{i}" for i in range(6)], cls_prob=True)
    with PairStoreWriter(root / "captions", "caption") as w:
        for i in range(8):
            image = f"img{i % 7}"  # img6 has no features
            w.add({"pair_id": f"p{i}", "image_id": image, "text": "a red circle " + "and a star " * i})
    with PairStoreWriter(root / "labels", "objects_labels") as w:
        w.add({"pair_id": "l0", "image_id": "img0", "text": "skateboard red circle",
               "words": ["skateboard", "red circle"], "word_regions": [2, 0]})
        w.add({"pair_id": "l1", "image_id": "img1", "text": "star",
               "words": ["star"], "word_regions": [1]})
    return features, PairStore(root / "captions"), PairStore(root / "labels")


def test_box_geometry_dims():
    boxes = np.array([[10, 20, 60, 120]], np.float32)
    g4, g5, g7 = (box_geometry(boxes, 100, 200, d) for d in (4, 5, 7))
    np.testing.assert_allclose(g4, [[0.1, 0.1, 0.6, 0.6]], rtol=1e-6)
    np.testing.assert_allclose(g5, [[0.1, 0.1, 0.6, 0.6, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(g7, [[0.1, 0.1, 0.6, 0.6, 0.25, 0.5, 0.5]], rtol=1e-6)
    with pytest.raises(ValueError):
        box_geometry(boxes, 100, 200, 6)
    # a box one pixel past the border is clipped to 1
    assert box_geometry(np.array([[0, 0, 101, 200]], np.float32), 100, 200, 4).max() == 1.0


def test_examples_and_missing_images(stores, tokenizer, caplog):
    features, captions, _ = stores
    with caplog.at_level("WARNING"):
        ds = PairDataset(captions, features, tokenizer, max_text_len=12, box_dims=7)
    assert ds.skipped == 1 and ds.missing_image_ids == ["img6"]
    assert "1 of 8 pair(s) skipped" in caplog.text
    assert len(ds) == 7
    ex = ds[2]
    assert ex["pair_id"] == "p2"
    ids = ex["input_ids"].tolist()
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids[1:-1]) == "a red circle and a star and a star"
    long = ds[5]["input_ids"]
    assert len(long) == 12 and long[-1] == tokenizer.sep_token_id  # truncated, [SEP] kept
    record = features.get("img2")
    n = record.num_boxes
    assert ex["region_features"].dtype == torch.float32 and ex["region_features"].shape == (n, 16)
    np.testing.assert_array_equal(ex["region_features"].numpy(), record.features.astype(np.float32))
    assert ex["region_boxes"].shape == (n, 7)
    assert ex["objects_id"].tolist() == record.objects_id.tolist()
    assert ex["cls_prob"].shape == (n, 1601)
    assert (ex["token_regions"] == -1).all()


def test_max_regions(stores, tokenizer):
    features, captions, labels = stores
    ds = PairDataset(labels, features, tokenizer, max_regions=1)
    ex = ds[0]
    assert ex["region_features"].shape[0] == 1
    # region 2 was cut: its label tokens lose the link; region 0 keeps it
    regions = ex["token_regions"].tolist()
    assert 2 not in regions and 0 in regions


def test_objects_labels_token_regions(stores, tokenizer):
    features, _, labels = stores
    ds = PairDataset(labels, features, tokenizer)
    ex = ds[0]
    tokens = tokenizer.convert_ids_to_tokens(ex["input_ids"].tolist())
    regions = ex["token_regions"].tolist()
    # skateboard is split into word pieces: every piece maps to region 2
    pieces = [t for t in tokens if t not in ("[CLS]", "[SEP]", "red", "circle")]
    assert len(pieces) >= 2
    by_token = dict(zip(tokens, regions))
    assert by_token["[CLS]"] == -1 and by_token["[SEP]"] == -1
    assert by_token["red"] == 0 and by_token["circle"] == 0
    assert all(r == 2 for t, r in zip(tokens, regions) if t in pieces)


def test_collate_pads_with_masks(stores, tokenizer):
    features, captions, labels = stores
    ds = PairDataset(captions, features, tokenizer, max_text_len=40)
    examples = [ds[0], ds[4]]
    batch = Collator(tokenizer.pad_token_id)([examples[0], examples[1]])
    t0, t1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(t0, t1))
    assert batch["text_mask"].sum(1).tolist() == [t0, t1]
    assert (batch["input_ids"][0, t0:] == tokenizer.pad_token_id).all()
    n0, n1 = (e["region_features"].shape[0] for e in examples)
    assert batch["region_mask"].sum(1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    n_short = min(n0, n1)
    assert (batch["objects_id"][short, n_short:] == IGNORE).all()
    assert (batch["region_features"][short, n_short:] == 0).all()
    assert batch["cls_prob"].shape[:2] == batch["region_mask"].shape
    assert batch["pair_id"] == ["p0", "p4"]
    assert batch["token_regions"].shape == batch["input_ids"].shape


def test_dataset_pickles_and_loads_in_workers(stores, tokenizer):
    features, captions, _ = stores
    ds = PairDataset(captions, features, tokenizer)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3]["pair_id"] == ds[3]["pair_id"]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator(0))
    assert sum(len(b["pair_id"]) for b in loader) == len(ds)


def test_hard_negatives(stores, tokenizer, tmp_path):
    features, captions, _ = stores
    with PairStoreWriter(tmp_path / "hn", "hard_negatives") as w:
        w.add({"pair_id": "h0", "image_id": "img0", "negatives": ["img6", "img3", "img1"],
               "negative_scores": [0.99, 0.5, 0.9]})
    ds = PairDataset(captions, features, tokenizer, hard_negatives=PairStore(tmp_path / "hn"),
                     hard_negative_top=1)
    assert ds.hard_negatives == {"img0": ["img1", "img3"]}  # img6 has no features; by score
    ex = ds[0]
    assert ex["negative"]["image_id"] == "img1"
    assert ex["negative"]["region_features"].shape[0] == features.get("img1").num_boxes
    assert "negative" not in ds[1]


def test_length_bucket_sampler_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 103)
    sampler = LengthBucketBatchSampler(lengths, 8, bucket_batches=4, seed=3)
    b0 = sampler.batches(0)
    assert sorted(i for b in b0 for i in b) == list(range(103))
    assert b0 == LengthBucketBatchSampler(lengths, 8, bucket_batches=4, seed=3).batches(0)
    assert b0 != sampler.batches(1)
    # batches are length-homogeneous: far less padding than random batches
    pad = sum(max(lengths[b]) * len(b) - lengths[b].sum() for b in b0)
    perm = rng.permutation(103)
    rand = [perm[i:i + 8] for i in range(0, 103, 8)]
    pad_random = sum(max(lengths[b]) * len(b) - lengths[b].sum() for b in rand)
    assert pad < pad_random / 2
    sampler.set_epoch(0, start_batch=5)
    assert list(sampler) == b0[5:]
    assert len(LengthBucketBatchSampler(lengths, 8, drop_last=True).batches(0)) == 103 // 8


def test_text_lengths_match_examples(stores, tokenizer):
    features, captions, labels = stores
    for store in (captions, labels):
        ds = PairDataset(store, features, tokenizer, max_text_len=12)
        assert ds.text_lengths().tolist() == [len(ds[i]["input_ids"]) for i in range(len(ds))]


def test_tiny_vocab_tokenizer(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "v" / "vocab.txt", ["red", "circle"]))
    assert tok.convert_ids_to_tokens(tok("Red circle blue")["input_ids"]) == [
        "[CLS]", "red", "circle", "[UNK]", "[SEP]"]


def test_hard_negatives_through_collate_and_itm_hs(stores, tokenizer, tmp_path):
    from vlp.trainer.tasks import TaskContext, make_tasks, prepare_batch

    features, captions, _ = stores
    with PairStoreWriter(tmp_path / "hn", "hard_negatives") as w:
        w.add({"pair_id": "h0", "image_id": "img0", "negatives": ["img3"], "negative_scores": [0.9]})
    ds = PairDataset(captions, features, tokenizer, hard_negatives=PairStore(tmp_path / "hn"))
    batch = collate([ds[0], ds[1], ds[2]], tokenizer.pad_token_id)  # only img0 has a hard negative
    assert batch["negative"]["negative_valid"].tolist() == [True, False, False]
    assert batch["negative"]["image_id"] == ["img3", "img1", "img2"]
    tasks = make_tasks([{"name": "ITM_HS", "negative_prob": 1.0}])
    prepared = prepare_batch(batch, tasks, torch.Generator().manual_seed(0), TaskContext.from_tokenizer(tokenizer))
    shown = prepared["shown_image_id"]
    assert shown[0] == "img3"  # the hard negative
    assert shown[1] in ("img0", "img2") and shown[2] in ("img0", "img1")  # in-batch fallback
    assert not prepared["matched"].any()
    n3 = features.get("img3").num_boxes
    np.testing.assert_array_equal(prepared["region_features"][0, :n3].numpy(),
                                  features.get("img3").features.astype(np.float32))


def _label_pieces(tokenizer, record, regions_kept: int):
    """LAMP's 2N labels of the first regions: every region's attribute and category word."""
    from vlp.schemas.labels import region_label_words

    words, regions, _ = region_label_words(record, attr_conf_floor=0.0)
    kept = [(w, r) for w, r in zip(words, regions) if r < regions_kept]
    expected = tokenizer([w for w, _ in kept], is_split_into_words=True, add_special_tokens=False)
    return expected["input_ids"], [kept[w][1] for w in expected.word_ids()]


def test_append_labels_links_label_tokens_to_regions(stores, tokenizer):
    features, captions, labels = stores
    plain = PairDataset(captions, features, tokenizer, max_text_len=12)
    augmented = PairDataset(captions, features, tokenizer, max_text_len=12, append_labels=2)
    a, b = plain[3], augmented[3]
    assert torch.equal(b["input_ids"], a["input_ids"])  # the caption alone: labels belong to the image
    ids, regions = _label_pieces(tokenizer, features.get(a["image_id"]), 2)
    assert b["label_ids"].tolist() == ids and b["label_regions"].tolist() == regions
    record = features.get(a["image_id"])
    assert len(set(regions)) == 2 and len(ids) >= 4  # a category and an attribute for each region

    batch = attach_label_tokens(collate([b], tokenizer.pad_token_id), tokenizer.sep_token_id)
    n = len(a["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == a["input_ids"].tolist()
    assert batch["input_ids"][0, n:].tolist() == ids + [tokenizer.sep_token_id]
    assert batch["token_regions"][0].tolist() == [-1] * n + regions + [-1]
    assert batch["text_mask"].all() and "label_ids" not in batch
    assert record.attrs_id is not None
    with pytest.raises(ValueError, match="objects_labels"):
        PairDataset(labels, features, tokenizer, append_labels=2)


def test_label_tokens_come_from_the_image_shown_after_an_itm_swap(stores, tokenizer):
    """LAMP + ITM: a mismatched pair must read the labels of the image it shows, or the
    label words reveal whether the pair matches (the leak this guards against)."""
    from vlp.trainer.tasks import TaskContext, make_tasks, prepare_batch

    features, captions, _ = stores
    ds = PairDataset(captions, features, tokenizer, max_text_len=12, append_labels=36)
    examples = [ds[i] for i in range(len(ds))]
    batch = collate(examples, tokenizer.pad_token_id)
    tasks = make_tasks([{"name": "ITM", "negative_prob": 0.5}])
    prepared = prepare_batch(batch, tasks, torch.Generator().manual_seed(3), TaskContext.from_tokenizer(tokenizer))
    assert (~prepared["matched"]).sum() >= 2 and prepared["matched"].sum() >= 1
    for row, example in enumerate(examples):
        shown = prepared["shown_image_id"][row]
        n = len(example["input_ids"])
        ids, regions = _label_pieces(tokenizer, features.get(shown), 36)
        length = int(prepared["text_mask"][row].sum())
        assert prepared["input_ids"][row, :n].tolist() == example["input_ids"].tolist()  # its own caption
        assert prepared["input_ids"][row, n:length].tolist() == ids + [tokenizer.sep_token_id]
        assert prepared["token_regions"][row, n:length].tolist() == regions + [-1]


def test_split_keeps_only_the_pairs_of_a_split(stores, tokenizer, tmp_path):
    features = stores[0]
    with PairStoreWriter(tmp_path / "karpathy", "caption") as w:
        for i, split in enumerate(["train", "train", "val", "test", "train", "restval", "val"]):
            w.add({"pair_id": f"k{i}", "image_id": f"img{i}", "text": "a red circle", "split": split})
    pairs = PairStore(tmp_path / "karpathy")
    everything = PairDataset(pairs, features, tokenizer)
    assert len(everything) == 6 and everything.skipped == 1  # img6 has no features
    train = PairDataset(pairs, features, tokenizer, split="train")
    assert [train[i]["pair_id"] for i in range(len(train))] == ["k0", "k1", "k4"] and train.skipped == 0
    both = PairDataset(pairs, features, tokenizer, split=["train", "restval"])
    assert len(both) == 4
    val = PairDataset(pairs, features, tokenizer, split="val")
    assert [val[i]["pair_id"] for i in range(len(val))] == ["k2"] and val.skipped == 1
    with pytest.raises(ValueError, match=r"karpathy: no pair of split dev \(the store has: train 3, val 2, "):
        PairDataset(pairs, features, tokenizer, split="dev")


def test_mixing_probabilities():
    from vlp.trainer.data import mixing_probabilities

    # no ratios: as if concatenated; all ratios: relative weights
    assert mixing_probabilities([None, None], [300, 100]).tolist() == [0.75, 0.25]
    assert mixing_probabilities([3, 1], [10, 1000]).tolist() == [0.75, 0.25]
    # some ratios: shares of all batches, the rest split by batch count
    assert np.allclose(mixing_probabilities([None, 0.5], [2300, 40]), [0.5, 0.5])
    assert np.allclose(mixing_probabilities([0.2, None, None], [5, 300, 100]), [0.2, 0.6, 0.2])
    with pytest.raises(ValueError, match=r"ratios \[0.7, None, 0.4\] add up to 1.1"):
        mixing_probabilities([0.7, None, 0.4], [1, 1, 1])
    with pytest.raises(ValueError, match="must be positive"):
        mixing_probabilities([0, 1], [1, 1])


def test_mixture_plan_is_a_pure_function_of_the_micro_batch():
    from vlp.trainer.data import MixturePlan

    samplers = [LengthBucketBatchSampler(np.arange(40) % 7, 4, seed=1),   # 10 batches an epoch
                LengthBucketBatchSampler(np.arange(12) % 5, 4, seed=2)]   # 3 batches an epoch
    plan = MixturePlan(samplers, [3, 1], seed=5)
    walk = list(zip(range(400), plan.iterate(0)))
    sources = np.array([item[1] for _, item in walk])
    assert 0.68 < (sources == 0).mean() < 0.82  # ratio 3:1
    for j, (jj, source, epoch, position, indices) in walk:
        assert jj == j and plan.locate(j) == (source, epoch, position)
        assert indices == samplers[source].batches(epoch)[position]
    # starting anywhere continues the same walk; ranks split it by j mod world size
    assert [x[0] for x in zip(plan.iterate(137), range(5))] == [item for _, item in walk[137:142]]
    rank1 = [x[0] for x in zip(plan.iterate(0, rank=1, world_size=2), range(50))]
    assert rank1 == [item for j, item in walk if j % 2 == 1][:50]
    # each source runs through whole epochs: every example once per epoch
    seen = [i for _, (j, s, e, p, idx) in walk if s == 1 and e == 0 for i in idx]
    assert sorted(seen) == list(range(12))
    with pytest.raises(ValueError, match="ratios"):
        MixturePlan(samplers, [0, 0])
