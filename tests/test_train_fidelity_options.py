"""Model and task options the papers' recipes need: ITM negatives on the text side, the
region-mask split, VL-BERT's visual clue / [MASK] embedding / sinusoidal geometry, LAMP's
label positions, and MOC_KL refusing a store without class distributions."""

from __future__ import annotations

import pytest
import torch

from vlp.trainer.data import load_tokenizer
from vlp.trainer.model import SingleStreamEncoder, VisualConfig, tiny_bert_config
from vlp.trainer.tasks import TaskContext, make_tasks, mask_regions, prepare_batch
from vlp.trainer.toydata import toy_batch as make_batch, write_vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORDS = ["a", "red", "blue", "circle", "star", "heart", "and", "near", "the", "large", "small"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", WORDS))


@pytest.fixture(scope="module")
def ctx(tok):
    return TaskContext.from_tokenizer(tok)


def encoder(tok, **visual):
    torch.manual_seed(0)
    model = SingleStreamEncoder(tiny_bert_config(len(tok)), VisualConfig(feature_dim=8, **visual))
    return model.eval()


def encoder_inputs(batch):
    keys = ("input_ids", "text_mask", "region_features", "region_boxes", "region_mask", "token_regions",
            "image_feature", "region_masked", "region_mask_how")
    return {k: batch[k] for k in keys if k in batch}


# -- ITM negatives ------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["image", "text", "both"])
def test_itm_negatives_replace_the_side_asked_for(tok, ctx, side):
    batch = make_batch(tok)
    counts = {"image": 0, "text": 0}
    for seed in range(30):
        task = make_tasks([{"name": "ITM", "negative_prob": 1.0, "negative_side": side}])
        prepared = prepare_batch(batch, task, torch.Generator().manual_seed(seed), ctx)
        assert not prepared["matched"].any()  # every row got another example's image or caption
        for row in range(4):
            same_image = torch.equal(prepared["region_features"][row, :6], batch["region_features"][row])
            same_text = torch.equal(prepared["input_ids"][row], batch["input_ids"][row])
            assert same_image != same_text  # exactly one side replaced
            counts["text" if same_image else "image"] += 1
            if same_image:  # the caption of another row, whole, with its padding mask
                source = next(r for r in range(4) if r != row and torch.equal(prepared["input_ids"][row],
                                                                              batch["input_ids"][r]))
                assert torch.equal(prepared["text_mask"][row], batch["text_mask"][source])
                assert prepared["text"][row] == batch["text"][source]
    if side == "both":
        assert 0.35 < counts["text"] / 120 < 0.65
    else:
        assert counts[side] == 120


def test_itm_negative_side_is_checked_when_the_config_is_read():
    with pytest.raises(ValueError, match="negative_side must be image, text or both"):
        make_tasks([{"name": "ITM", "negative_side": "caption"}])
    with pytest.raises(ValueError, match="unknown option"):
        make_tasks([{"name": "ITM_HS", "negative_side": "text"}])


# -- region masking -------------------------------------------------------------------------

def test_region_mask_split_is_the_share_of_each_replacement():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 36, 4, generator=g).abs() + 0.1
    mask = torch.ones(200, 36, dtype=torch.bool)
    out, masked, how = mask_regions(features, mask, g, 0.15, (0.9, 0.0, 0.1))  # ImageBERT
    shares = [(how[masked] == k).float().mean().item() for k in range(3)]
    assert abs(shares[0] - 0.9) < 0.03 and shares[1] == 0.0 and abs(shares[2] - 0.1) < 0.03
    assert (out[masked & (how == 0)] == 0).all()
    assert torch.equal(out[masked & (how == 2)], features[masked & (how == 2)])
    out, masked, how = mask_regions(features, mask, g, 0.15, (1.0, 0.0, 0.0))
    assert (how[masked] == 0).all()


def test_stage_checks_the_region_mask_split():
    from vlp.trainer.config import StageConfig

    assert StageConfig(steps=1).region_mask_split == (0.8, 0.1, 0.1)
    assert StageConfig(steps=1, region_mask_split=[0.9, 0, 0.1]).to_dict()["region_mask_split"] == [0.9, 0.0, 0.1]
    for bad in ([0.5, 0.5], [0.9, 0.2, -0.1], [0.5, 0.2, 0.2], "0.8"):
        with pytest.raises(ValueError, match="region_mask_split"):
            StageConfig(steps=1, region_mask_split=bad)


# -- VL-BERT --------------------------------------------------------------------------------

def test_mask_embedding_replaces_every_zeroed_region_by_one_learned_vector(tok, ctx):
    model = encoder(tok, mask_embedding=True)
    batch = prepare_batch(make_batch(tok), make_tasks(["MOC"]), torch.Generator().manual_seed(1), ctx,
                          region_prob=0.5, region_split=(1.0, 0.0, 0.0))
    replaced = batch["region_masked"]
    assert replaced.sum() >= 4
    with torch.no_grad():
        got = model.region_embeddings(batch["region_features"], batch["region_boxes"],
                                      replaced & (batch["region_mask_how"] == 0))
        boxes = model.box_proj(batch["region_boxes"])
    torch.testing.assert_close(got[replaced], model.region_mask_embedding.expand(int(replaced.sum()), -1)
                               + boxes[replaced])
    # the [MASK] vector is what the model sees: the masked region's own (zeroed) feature does not matter
    changed = dict(batch, region_features=batch["region_features"].clone())
    changed["region_features"][replaced] = 5.0
    with torch.no_grad():
        a, b = model(**encoder_inputs(batch)).sequence, model(**encoder_inputs(changed)).sequence
    torch.testing.assert_close(a, b)


def test_visual_clue_adds_the_whole_image_to_every_text_token(tok):
    batch = make_batch(tok)
    plain, clue = encoder(tok), encoder(tok, visual_clue=True)
    clue.load_state_dict(plain.state_dict())
    image = torch.randn(4, 8)
    with torch.no_grad():
        a = clue(**encoder_inputs(dict(batch, image_feature=image))).text
        b = clue(**encoder_inputs(dict(batch, image_feature=image * 2 + 1))).text
        c = plain(**encoder_inputs(dict(batch, image_feature=image))).text
    assert (a - b).abs().amax(-1)[batch["text_mask"]].min() > 1e-4  # every text token sees the image
    assert (a - c).abs().amax(-1)[batch["text_mask"]].min() > 1e-4


@pytest.mark.parametrize("visual", [{"image_token": True}, {"visual_clue": True}])
def test_whole_image_fallback_never_sees_a_masked_region(tok, ctx, visual):
    """Without a stored image feature the whole image is the mean of the unmasked regions:
    a masked region's original content must not reach the model through it."""
    model = encoder(tok, **visual)
    batch = prepare_batch(make_batch(tok), make_tasks(["MOC"]), torch.Generator().manual_seed(2), ctx,
                          region_prob=0.4, region_split=(0.0, 0.0, 1.0))  # kept: content stays in the input
    masked = batch["region_masked"]
    assert masked.any()
    with torch.no_grad():
        out = model(**encoder_inputs(batch)).text
        # what the model would see if masked regions leaked: their content changes the output
        leaked = model(**encoder_inputs({k: v for k, v in batch.items() if k != "region_masked"})).text
        changed = dict(batch, region_features=batch["region_features"].clone())
        changed["region_features"][masked] += 3.0
        # the kept masked regions are still inputs themselves, so compare the whole-image term only
        whole = model._whole_image(batch["region_features"], batch["region_mask"], masked, None)
        whole_changed = model._whole_image(changed["region_features"], batch["region_mask"], masked, None)
    torch.testing.assert_close(whole, whole_changed)
    assert (out - leaked).abs().max() > 1e-4  # the mask really changed the whole-image term


def test_sinusoidal_geometry_embeds_each_coordinate_at_several_wavelengths(tok):
    from vlp.trainer.model import SinusoidalBoxes

    sinusoids = SinusoidalBoxes(frequencies=16)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
    out = sinusoids(boxes)
    assert out.shape == (2, 4 * 32)
    torch.testing.assert_close(out[0, :16], torch.zeros(16))  # sin(0)
    torch.testing.assert_close(out[0, 16:32], torch.ones(16))  # cos(0)
    assert torch.allclose(out[1].view(4, 32).pow(2).view(4, 2, 16).sum(1), torch.ones(4, 16))
    model = encoder(tok, geometry="sinusoidal", box_dims=4)
    batch = make_batch(tok)
    batch["region_boxes"] = batch["region_boxes"][..., :4]
    with torch.no_grad():
        assert torch.isfinite(model(**encoder_inputs(batch)).sequence).all()
    with pytest.raises(ValueError, match="geometry must be linear or sinusoidal"):
        VisualConfig(geometry="fourier")


# -- LAMP -----------------------------------------------------------------------------------

def test_a_label_token_takes_its_region_geometry_in_place_of_a_text_position(tok):
    """The same label word linked to the same region gives the same embedding wherever it
    stands in the text: no sequential position is added to it."""
    model = encoder(tok, label_spatial=True)
    captured = []
    model.bert.embeddings.register_forward_hook(lambda module, args, out: captured.append(out))
    word = tok.convert_tokens_to_ids("circle")
    ids = torch.tensor([[tok.cls_token_id, word, word, word, tok.sep_token_id]])
    batch = {"input_ids": ids, "text_mask": torch.ones_like(ids, dtype=torch.bool),
             "token_regions": torch.tensor([[-1, 0, 0, -1, -1]]),
             "region_features": torch.rand(1, 2, 8), "region_boxes": torch.rand(1, 2, 5),
             "region_mask": torch.ones(1, 2, dtype=torch.bool)}
    with torch.no_grad():
        model(**batch)
    embedded = captured[0][0]
    torch.testing.assert_close(embedded[1], embedded[2])  # label tokens at positions 1 and 2
    assert (embedded[2] - embedded[3]).abs().max() > 1e-3  # the plain word at 3 has its position


def test_moc_kl_is_refused_on_a_store_without_class_distributions(tmp_path, tok):
    from vlp.schemas.pairs import PairStoreWriter
    from vlp.trainer.config import ConfigError
    from vlp.trainer.schedule import check_stores
    from vlp.trainer.toydata import tiny_feature_store, write_vocab

    tiny_feature_store(tmp_path / "features", ["img0", "img1"], feature_dim=8)
    features = tmp_path / "features"
    with PairStoreWriter(tmp_path / "pairs", "caption") as writer:
        writer.add({"pair_id": "p0", "image_id": "img0", "text": "a red circle"})
    vocab = write_vocab(tmp_path / "vocab.txt", ["red", "circle"])
    config = {"model": {"vocab": str(vocab), "bert": {"hidden": 16, "layers": 1, "heads": 2},
                        "visual": {"feature_dim": 8}},
              "data": {"features": str(features)},
              "stages": [{"pairs": str(tmp_path / "pairs"), "tasks": ["MLM", "MOC_KL"], "steps": 1}]}
    with pytest.raises(ConfigError, match="MOC_KL needs the detector's class distribution.*with_probs=true"):
        check_stores(config)
    config["stages"][0]["tasks"] = ["MLM", "MOC"]
    check_stores(config)


# -- Singh et al.: VQA-P ------------------------------------------------------------------

def test_vqa_p_text_is_the_question_then_an_answer_drawn_by_its_score(tmp_path, tok):
    import collections

    from vlp.schemas.pairs import PairStore, PairStoreWriter
    from vlp.trainer.config import TrainConfig
    from vlp.trainer.data import PairDataset
    from vlp.trainer.toydata import tiny_feature_store

    features = tiny_feature_store(tmp_path / "features", ["img0"], feature_dim=8)
    with PairStoreWriter(tmp_path / "vqa", "question") as writer:
        writer.add({"pair_id": "q0", "image_id": "img0", "text": "the red circle", "question_id": "0",
                    "answers": ["star", "heart"], "answer_scores": [0.75, 0.25]})
    pairs = PairStore(tmp_path / "vqa")
    dataset = PairDataset(pairs, features, tok, answer_text=True)
    question = tok("the red circle")["input_ids"]
    drawn = collections.Counter()
    for epoch in range(400):
        ids = dataset.example(0, epoch)["input_ids"].tolist()
        assert ids[:len(question)] == question and ids[-1] == tok.sep_token_id
        drawn[tok.decode(ids[len(question):-1])] += 1
    assert set(drawn) == {"star", "heart"}
    assert 0.68 < drawn["star"] / 400 < 0.82
    assert dataset.example(0, 7)["input_ids"].tolist() == dataset.example(0, 7)["input_ids"].tolist()
    with pytest.raises(ValueError, match="answer_text is for question pairs"):
        from vlp.schemas.pairs import PairStoreWriter as Writer

        with Writer(tmp_path / "captions", "caption") as writer:
            writer.add({"pair_id": "c0", "image_id": "img0", "text": "a red circle"})
        PairDataset(PairStore(tmp_path / "captions"), features, tok, answer_text=True)
    config = TrainConfig.from_dict({"model": {"vocab": "demo"}, "data": {"features": "f"},
                                    "stages": [{"pairs": "p", "tasks": ["MLM"], "steps": 1, "answer_text": True}]})
    assert config.stages[0].sources[0].answer_text is True
    with pytest.raises(ValueError, match="answer_text must be true or false"):
        TrainConfig.from_dict({"model": {"vocab": "demo"}, "data": {"features": "f"},
                               "stages": [{"pairs": "p", "tasks": ["MLM"], "steps": 1, "answer_text": "yes"}]})


# -- MSP: TITS reads the pooled output like TITP ------------------------------------------------

@pytest.mark.parametrize("representation", ["pooled", "regions"])
def test_topic_tasks_read_the_representation_asked_for(tok, ctx, representation):
    from vlp.trainer.tasks import PretrainModel

    torch.manual_seed(0)
    encoder_ = SingleStreamEncoder(tiny_bert_config(len(tok)), VisualConfig(feature_dim=8))
    spec = [{"name": "TITS", "representation": representation}] if representation != "pooled" else ["TITS"]
    model = PretrainModel(encoder_, make_tasks(spec), ctx).eval()  # no dropout: two encodes agree
    prepared = prepare_batch(make_batch(tok), model.tasks, torch.Generator().manual_seed(0), ctx)
    seen = []
    model.heads["TITS"].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(prepared, None, prepared=True)
    out = model.encode(prepared)
    if representation == "pooled":
        expected = out.pooled
    else:
        weights = prepared["region_mask"].unsqueeze(-1).float()
        expected = (out.regions * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ValueError, match="representation must be pooled or regions"):
        make_tasks([{"name": "TITP", "representation": "cls"}])


# -- feature standardization ---------------------------------------------------------------------

def test_feature_statistics_are_the_mean_and_std_over_every_region(tmp_path):
    import numpy as np

    from vlp.trainer.data import feature_statistics
    from vlp.trainer.toydata import tiny_feature_store

    store = tiny_feature_store(tmp_path / "f", [f"img{i}" for i in range(7)], feature_dim=8)
    everything = np.concatenate([np.asarray(r.features, dtype=np.float64) for r in store])
    mean, std = feature_statistics(store)
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, np.maximum(everything.std(0), 1e-3), rtol=1e-4, atol=1e-6)
    sampled_mean, _ = feature_statistics(store, max_records=3)  # a spread-out subset
    assert sampled_mean.shape == (8,) and not np.allclose(sampled_mean, mean)


def test_normalize_features_equals_feeding_standardized_features(tok):
    plain, normalized = encoder(tok), encoder(tok, normalize_features=True)
    normalized.load_state_dict({**plain.state_dict(), "feature_mean": normalized.feature_mean,
                                "feature_std": normalized.feature_std})
    mean, std = torch.rand(8) + 0.5, torch.rand(8) + 0.5
    normalized.set_feature_statistics(mean, std)
    batch = make_batch(tok)
    standardized = dict(batch, region_features=(batch["region_features"] - mean) / std)
    with torch.no_grad():
        torch.testing.assert_close(normalized(**encoder_inputs(batch)).sequence,
                                   plain(**encoder_inputs(standardized)).sequence)
    assert {"feature_mean", "feature_std"} <= set(normalized.state_dict())  # checkpoints carry them
    with pytest.raises(ValueError, match="without visual.normalize_features"):
        plain.set_feature_statistics(mean, std)


def test_build_encoder_takes_the_statistics_of_the_config_store(tmp_path, tok):
    import numpy as np

    from vlp.trainer.data import feature_statistics
    from vlp.trainer.schedule import build_encoder
    from vlp.trainer.toydata import tiny_feature_store

    store = tiny_feature_store(tmp_path / "f", ["a", "b", "c"], feature_dim=8)
    config = {"model": {"vocab": "demo", "bert": {"hidden": 16, "layers": 1, "heads": 2},
                        "visual": {"feature_dim": 8, "normalize_features": True}},
              "data": {"features": str(tmp_path / "f")}, "stages": [{"pairs": "p", "tasks": ["MLM"], "steps": 1}]}
    built = build_encoder(config, tok)
    mean, std = feature_statistics(store)
    np.testing.assert_allclose(built.feature_mean.numpy(), mean)
    np.testing.assert_allclose(built.feature_std.numpy(), std)
    config["model"]["architecture"] = "lxmert_s"
    with pytest.raises(ValueError, match="normalize_features"):
        build_encoder(config, tok)
