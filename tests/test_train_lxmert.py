"""LXMERT-S (LxmertModel, l_layers = r_layers = 0): interface, masks, tasks, BERT embeddings."""

from __future__ import annotations

import pytest
import torch

from vlp.trainer.data import IGNORE, load_tokenizer
from vlp.trainer.lxmert import CrossModalEncoder
from vlp.trainer.model import VisualConfig
from vlp.trainer.tasks import PretrainModel, TaskContext, make_tasks, prepare_batch
from vlp.trainer.toydata import write_vocab


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("v") / "vocab.txt",
                                      ["a", "red", "circle", "star", "heart", "near", "the"]))


def _encoder(tok, seed=0, **visual):
    torch.manual_seed(seed)
    vis = VisualConfig(feature_dim=8, box_dims=7, **visual)
    return CrossModalEncoder(CrossModalEncoder.make_config(len(tok), vis, hidden=32, heads=2, x_layers=2), vis)


def _batch(tok, seed=0):
    from vlp.schemas import vocab

    g = torch.Generator().manual_seed(seed)
    enc = tok(["a red circle near the star", "a heart", "the star", "a circle"], padding=True, return_tensors="pt")
    region_mask = torch.ones(4, 5, dtype=torch.bool)
    region_mask[1, 3:] = False
    objects = torch.full((4, 5), vocab.objects().id("star")).masked_fill(~region_mask, IGNORE)
    return {"input_ids": enc["input_ids"], "text_mask": enc["attention_mask"].bool(),
            "token_regions": torch.full(enc["input_ids"].shape, -1), "image_id": ["a", "b", "c", "d"],
            "pair_id": ["1", "2", "3", "4"], "text": ["a red circle near the star", "a heart", "the star", "a circle"],
            "region_features": torch.randn(4, 5, 8, generator=g), "region_boxes": torch.rand(4, 5, 7, generator=g),
            "region_mask": region_mask, "objects_id": objects, "attrs_id": objects.clamp(max=399),
            "objects_conf": torch.ones(4, 5), "attrs_conf": torch.ones(4, 5)}


def test_shapes_and_padding(tok):
    model = _encoder(tok).eval()
    batch = _batch(tok)
    with torch.no_grad():
        out = model(**batch)
        assert out.text.shape == (4, batch["input_ids"].shape[1], 32) and out.regions.shape == (4, 5, 32)
        t = int(batch["text_mask"][1].sum())
        one = {k: (v[1:2, :t] if k in ("input_ids", "text_mask", "token_regions") else v[1:2, :3])
               for k, v in batch.items() if isinstance(v, torch.Tensor)}
        alone = model(**one)
    torch.testing.assert_close(out.text[1, :t], alone.text[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.regions[1, :3], alone.regions[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled[1], alone.pooled[0], rtol=1e-5, atol=1e-5)


def test_tasks_train_and_ifrs_is_refused(tok):
    ctx = TaskContext.from_tokenizer(tok)
    model = PretrainModel(_encoder(tok), make_tasks(["MLM", "MOC", "MRFR", "ITM", "TITP"]), ctx)
    g = torch.Generator().manual_seed(0)
    prepared = prepare_batch(_batch(tok), model.tasks, g, ctx, text_prob=0.5, region_prob=0.5)
    prepared["matched"][:] = True
    total, losses, _ = model(prepared, g, prepared=True)
    assert torch.isfinite(total) and all(l.item() > 0 for n, l in losses.items() if n != "TITP")
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["encoder.lxmert.encoder.visn_fc.visn_fc.weight"].abs().sum() > 0
    assert grads["encoder.lxmert.embeddings.word_embeddings.weight"].abs().sum() > 0
    ifrs = PretrainModel(_encoder(tok), make_tasks([{"name": "IFRS", "prob": 0.5}]), ctx)
    prepared = prepare_batch(_batch(tok), ifrs.tasks, g, ctx)
    assert ifrs(prepared, g, prepared=True)[1]["IFRS"].item() > 0
    with pytest.raises(ValueError):
        _encoder(tok, image_token=True)


def test_label_tokens_use_region_geometry(tok):
    model = _encoder(tok).eval()
    batch = _batch(tok)
    batch["token_regions"][0, 2] = 4
    moved = dict(batch, region_boxes=batch["region_boxes"].clone())
    moved["region_boxes"][0, 4, :2] += 0.2
    with torch.no_grad():
        a, b = model(**batch).text, model(**moved).text
    assert not torch.allclose(a[0, 2], b[0, 2])


def test_text_embeddings_from_bert_checkpoint(tmp_path, minilm_checkpoint):
    path = minilm_checkpoint
    from safetensors.torch import load_file

    encoder = CrossModalEncoder.build({"text_checkpoint": str(path), "lxmert": {"x_layers": 1}},
                                      VisualConfig(feature_dim=8, box_dims=4), tokenizer=None)
    reference = load_file(str(path / "model.safetensors"))
    state = encoder.lxmert.state_dict()
    for key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "pooler.dense.weight"):
        assert torch.equal(state[key], reference[key]), key
    assert encoder.hidden_size == 384 and encoder.config.x_layers == 1
