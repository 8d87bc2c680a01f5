"""Pretraining tasks: masking rules, conditional masking, IFRS, topics, losses and gradients."""

from __future__ import annotations

import pytest
import torch

from vlp.trainer.data import IGNORE, load_tokenizer
from vlp.trainer.model import SingleStreamEncoder, VisualConfig, tiny_bert_config
from vlp.trainer.tasks import (PretrainModel, TaskContext, ifrs_restore, make_tasks, mask_regions,
                               mask_tokens, prepare_batch, shuffle_triplets)
from vlp.trainer.toydata import toy_batch as make_batch, write_vocab

WORDS = ["a", "red", "blue", "circle", "star", "heart", "and", "near", "the", "large", "small", "person"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", WORDS))


@pytest.fixture(scope="module")
def ctx(tok):
    return TaskContext.from_tokenizer(tok)


def make_model(tok, ctx, spec, positions="shared", seed=0):
    torch.manual_seed(seed)
    encoder = SingleStreamEncoder(tiny_bert_config(len(tok)), VisualConfig(feature_dim=8, region_positions=positions))
    return PretrainModel(encoder, make_tasks(spec), ctx)


def test_mlm_masking_statistics_and_specials(tok, ctx):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (400, 50), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    ids[:, 40:49] = tok.pad_token_id
    text_mask = ids != tok.pad_token_id
    out, labels = mask_tokens(ids, text_mask, ctx, g)
    masked = labels != IGNORE
    specials = torch.isin(ids, torch.tensor(ctx.special_ids))
    assert not (masked & specials).any()  # never [CLS]/[SEP]/[PAD]
    assert (out[specials] == ids[specials]).all()
    rate = masked.sum() / (~specials).sum()
    assert abs(rate.item() - 0.15) < 0.01
    as_mask = (out[masked] == tok.mask_token_id).float().mean().item()
    kept = (out[masked] == ids[masked]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03  # random swap may hit the same id rarely
    swapped = masked & (out != ids) & (out != tok.mask_token_id)
    assert abs(swapped.sum().item() / masked.sum().item() - 0.1) < 0.03
    assert not torch.isin(out[swapped], torch.tensor(ctx.special_ids)).any()
    assert (labels[masked] == ids[masked]).all()


def test_region_masking_split():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(200, 40, 4, generator=g) + 5.0  # no zero rows by chance
    region_mask = torch.ones(200, 40, dtype=torch.bool)
    region_mask[:, 35:] = False
    out, masked, how = mask_regions(features, region_mask, g)
    assert not masked[:, 35:].any()
    assert abs(masked.sum().item() / region_mask.sum().item() - 0.15) < 0.01
    zero = (out[masked] == 0).all(-1)
    keep = (out[masked] == features[masked]).all(-1)
    other = ~zero & ~keep
    n = masked.sum().item()
    assert abs(zero.sum().item() / n - 0.8) < 0.03
    assert abs(keep.sum().item() / n - 0.1) < 0.03
    assert abs(other.sum().item() / n - 0.1) < 0.03
    # a random replacement is another real region of the batch, never the region itself
    assert torch.equal(other, (how[masked] == 1))
    pool = features[region_mask]
    for row in out[masked][other]:
        assert ((pool - row).abs().sum(-1) == 0).any()
    assert (out[~masked] == features[~masked]).all()
    # two real regions (and padding): a random replacement is always the other one
    two = torch.tensor([[[1.0], [2.0], [0.0]]])
    replaced = 0
    for _ in range(100):
        out, masked, how = mask_regions(two, torch.tensor([[True, True, False]]), g, prob=1.0)
        for k in torch.nonzero(how[0, :2] == 1).flatten().tolist():
            assert out[0, k, 0] == two[0, 1 - k, 0]
            replaced += 1
    assert replaced > 5


@pytest.mark.parametrize("architecture", ["single_stream", "lxmert_s"])
def test_masked_regions_do_not_blow_up_gradients(tok, ctx, architecture):
    """Zeroed regions pass a LayerNorm; with a biased feature projection that LayerNorm saw
    a near-constant vector and this gradient norm was 64,700 (single-stream) / 57,600
    (LXMERT-S), which clipping turns into a frozen step for the whole model; bias-free: 5-6."""
    from vlp.trainer.lxmert import CrossModalEncoder

    torch.manual_seed(0)
    visual = VisualConfig(feature_dim=8)
    encoder = (SingleStreamEncoder(tiny_bert_config(len(tok)), visual) if architecture == "single_stream" else
               CrossModalEncoder(CrossModalEncoder.make_config(len(tok), visual, hidden=32, heads=2, x_layers=2),
                                 visual))
    model = PretrainModel(encoder, make_tasks(["MOC", "MRFR"]), ctx)
    g = torch.Generator().manual_seed(0)
    prepared = prepare_batch(make_batch(tok), model.tasks, g, ctx, region_prob=0.5)
    assert (prepared["region_masked"] & (prepared["region_mask_how"] == 0)).any()
    total, _, _ = model(prepared, g, prepared=True)
    total.backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
    print(architecture, "gradient norm", norm)
    assert norm < 100


def test_itm_negatives_and_conditional_masking(tok, ctx):
    batch = make_batch(tok)
    # label tokens (LAMP): token 2 -> region 0, token 3 -> region 5 (image 1 has only 4 regions)
    batch["token_regions"][:, 2] = 0
    batch["token_regions"][:, 3] = 5
    batch["token_regions"][1, 3] = -1
    g = torch.Generator().manual_seed(3)
    tasks = make_tasks(["ITM", "MLM", "MOC"])
    counts = 0
    for _ in range(50):
        prepared = prepare_batch(batch, tasks, g, ctx)
        matched = prepared["matched"]
        counts += (~matched).sum().item()
        assert torch.equal(prepared["token_regions"][matched], batch["token_regions"][matched])
        for row in torch.nonzero(~matched).flatten().tolist():
            shown = prepared["shown_image_id"][row]
            j = int(shown[3:])
            assert shown != batch["image_id"][row]
            mask = prepared["region_mask"][row]
            assert torch.equal(mask, batch["region_mask"][j])
            assert torch.equal(prepared["objects_id"][row], batch["objects_id"][j])
            # labels take the geometry of the shown image's k-th region, if it has one
            links = prepared["token_regions"][row]
            assert links[2] == 0 and links[3] == (-1 if j == 1 or row == 1 else 5)
            assert (links[[0, 1]] == -1).all() and (links[4:] == -1).all()
    assert abs(counts / 200 - 0.5) < 0.1
    # every pair a negative: masked losses vanish, ITM does not
    model = make_model(tok, ctx, ["ITM", "MLM", "MOC", "MRFR"])
    prepared = prepare_batch(batch, model.tasks, g, ctx)
    prepared["matched"] = torch.zeros(4, dtype=torch.bool)
    total, losses, _ = model(prepared, g, prepared=True)
    assert losses["MLM"].item() == 0 and losses["MOC"].item() == 0 and losses["MRFR"].item() == 0
    assert losses["ITM"].item() > 0
    prepared["matched"][:] = True
    _, losses, _ = model(prepared, g, prepared=True)
    assert losses["MLM"].item() > 0 and losses["MOC"].item() > 0 and losses["MRFR"].item() > 0


def test_itm_hs_uses_hard_negative(tok, ctx):
    batch = make_batch(tok)
    neg = make_batch(tok, regions=9, seed=7)
    batch["negative"] = {k: neg[k] for k in ("region_features", "region_boxes", "region_mask", "objects_id",
                                             "attrs_id", "objects_conf", "attrs_conf", "cls_prob")}
    batch["negative"]["image_id"] = [f"hard{i}" for i in range(4)]
    g = torch.Generator().manual_seed(0)
    prepared = prepare_batch(batch, make_tasks(["ITM_HS"]), g, ctx)
    rows = torch.nonzero(~prepared["matched"]).flatten().tolist()
    assert rows and prepared["region_features"].shape[1] == 9
    for r in rows:
        assert prepared["shown_image_id"][r] == f"hard{r}"
        assert torch.equal(prepared["region_features"][r], neg["region_features"][r])
    for r in set(range(4)) - set(rows):
        assert torch.equal(prepared["region_features"][r, :6], batch["region_features"][r])
        assert not prepared["region_mask"][r, 6:].any()


def test_itm_hs_falls_back_to_in_batch_negatives(tok, ctx):
    # no pair of the batch has a hard negative: collate adds no "negative" at all
    batch = make_batch(tok)
    g = torch.Generator().manual_seed(0)
    prepared = prepare_batch(batch, make_tasks(["ITM_HS"]), g, ctx)
    rows = torch.nonzero(~prepared["matched"]).flatten().tolist()
    assert rows
    for r in rows:
        j = int(prepared["shown_image_id"][r][3:])
        assert j != r and torch.equal(prepared["region_mask"][r], batch["region_mask"][j])


def test_task_options_are_checked():
    assert make_tasks([{"name": "IFRS", "prob": 0.1}])[0].options == {"prob": 0.1}
    with pytest.raises(ValueError, match=r"task IFRS: unknown option\(s\) p \(its options: prob\)"):
        make_tasks([{"name": "IFRS", "p": 0.1}])
    with pytest.raises(ValueError, match=r"task MLM: unknown option\(s\) prob \(its options: none\)"):
        make_tasks([{"name": "MLM", "prob": 0.2}])
    with pytest.raises(ValueError, match="task ITM: weight must be a non-negative number"):
        make_tasks({"ITM": "1"})


def test_ifrs_shuffle_and_perfect_restore():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(64, 12, 8, generator=g)
    boxes = torch.rand(64, 12, 5, generator=g)
    region_mask = torch.ones(64, 12, dtype=torch.bool)
    region_mask[0, 10:] = False  # 10 real regions: 3 triplets, region 9 never moves
    shuffled, sboxes, moved, source = shuffle_triplets(features, boxes, region_mask, g, prob=0.3)
    assert moved.any() and not moved[0, 9:].any()
    rate = moved.view(64, 4, 3).any(-1).float().mean().item()
    assert 0.15 < rate < 0.45
    for b in range(64):  # a permutation within each triplet
        for t in range(4):
            assert sorted(source[b, 3 * t:3 * t + 3].tolist()) == [3 * t, 3 * t + 1, 3 * t + 2]
    assert torch.equal(shuffled, torch.gather(features, 1, source.unsqueeze(-1).expand(-1, -1, 8)))
    assert torch.equal(sboxes, boxes)  # only features move
    # a perfect model predicts the original feature at each position: order restored
    order = ifrs_restore(features, shuffled, moved)
    restored = torch.gather(shuffled, 1, order.unsqueeze(-1).expand(-1, -1, 8))
    assert torch.equal(restored, features)
    assert shuffle_triplets(features, boxes, region_mask, g, prob=0.0)[2].sum() == 0


def test_ifrs_moves_features_and_their_labels_not_boxes(tok, ctx):
    model = make_model(tok, ctx, [{"name": "IFRS", "prob": 0.5}])  # shared positions: boxes tell
    batch = make_batch(tok)
    g = torch.Generator().manual_seed(0)
    prepared = prepare_batch(batch, model.tasks, g, ctx)
    src = prepared["ifrs_source"]
    assert prepared["ifrs_moved"].any()
    assert torch.equal(prepared["objects_id"], torch.gather(batch["objects_id"], 1, src))
    assert torch.equal(prepared["region_boxes"], batch["region_boxes"])
    total, losses, _ = model(prepared, g, prepared=True)
    assert losses["IFRS"].item() > 0


def test_pair_topics_from_object_ids():
    from vlp.schemas import vocab
    from vlp.trainer.topics import pair_topics

    ids = [vocab.objects().id(n) for n in ("circle", "star", "heart", "circle")]
    assert sorted(pair_topics("Two circles near a star.", ids)) == ["circle", "star"]


def test_tits_targets(tok, ctx):
    batch = make_batch(tok)
    model = make_model(tok, ctx, ["TITP", "TITS"])
    g = torch.Generator().manual_seed(0)
    prepared = prepare_batch(batch, model.tasks, g, ctx)
    target = prepared["topic_targets"]
    vocab = tok.get_vocab()
    # image labels: circle, star, heart; text 0 mentions circle and star (and red, blue: not labels)
    assert {i for i in torch.nonzero(target[0]).flatten().tolist()} == {vocab["circle"], vocab["star"]}
    assert torch.nonzero(target[1]).flatten().tolist() == [vocab["heart"]]
    # a precomputed topics column wins
    prepared = prepare_batch(dict(batch, topics=[["person"], [], [], []]), model.tasks, g, ctx)
    assert torch.nonzero(prepared["topic_targets"][0]).flatten().tolist() == [vocab["person"]]
    assert prepared["topic_targets"][1:].sum() == 0
    total, losses, _ = model(prepared, g, prepared=True)
    assert torch.isfinite(total)


ALL = ["MLM", "MOC", "MOC_KL", "MRFR", "ITM", "TITP", "TITS"]


@pytest.mark.parametrize("name", ALL + ["IFRS"])
def test_each_loss_finite_with_gradients(tok, ctx, name):
    spec = [{"name": name, "prob": 0.5}] if name == "IFRS" else [name]
    model = make_model(tok, ctx, spec, positions="index")
    batch = make_batch(tok)
    g = torch.Generator().manual_seed(0)
    # enough masking that every masked loss has targets
    prepared = prepare_batch(batch, model.tasks, g, ctx, text_prob=0.5, region_prob=0.5)
    total, losses, _ = model(prepared, g, prepared=True)
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    params = dict(model.named_parameters())
    head = [p for n, p in params.items() if n.startswith(f"heads.{model.tasks[0].name}.")]
    assert head and all(p.grad is not None and torch.isfinite(p.grad).all() for p in head)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    layer = params["encoder.bert.encoder.layer.0.attention.self.query.weight"]
    assert layer.grad is not None and layer.grad.abs().sum() > 0
    if name in ("MOC", "MOC_KL", "MRFR", "IFRS", "TITS", "ITM"):
        assert params["encoder.feature_proj.0.weight"].grad.abs().sum() > 0
    if name == "MLM":  # the decoder is tied to the word embeddings
        assert params["encoder.bert.embeddings.word_embeddings.weight"].grad.abs().sum() > 0


def test_all_tasks_together_and_names(tok, ctx):
    model = make_model(tok, ctx, {"MLM": 1.0, "MOC": 1.0, "MOR": 0.5, "VLM": 1.0, "TITS": 0.2})
    assert [t.name for t in model.tasks] == ["MLM", "MOC", "MRFR", "ITM", "TITS"]
    total, losses, _ = model(make_batch(tok), torch.Generator().manual_seed(0))
    assert torch.isfinite(total)
    expected = sum(t.weight * losses[t.name] for t in model.tasks)
    torch.testing.assert_close(total, expected)
    with pytest.raises(ValueError, match="unknown task"):
        make_tasks(["XYZ"])
    with pytest.raises(ValueError, match="one of them"):
        make_tasks(["ITM", "ITM_HS"])
