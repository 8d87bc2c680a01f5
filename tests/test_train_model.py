"""Single-stream encoder: BERT checkpoint loading, embeddings, masks, LAMP spatial labels."""

from __future__ import annotations

import pytest
import torch

from vlp.trainer.model import SingleStreamEncoder, VisualConfig, tiny_bert_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(batch=2, text=6, regions=4, dim=12, box_dims=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 50, (batch, text), generator=g)
    text_mask = torch.ones(batch, text, dtype=torch.bool)
    text_mask[1, text - 2:] = False
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[0, regions - 1:] = False
    return {
        "input_ids": input_ids, "text_mask": text_mask,
        "region_features": torch.randn(batch, regions, dim, generator=g),
        "region_boxes": torch.rand(batch, regions, box_dims, generator=g),
        "region_mask": region_mask,
        "token_regions": torch.full((batch, text), -1, dtype=torch.long),
    }


def _model(seed=0, **visual):
    torch.manual_seed(seed)
    return SingleStreamEncoder(tiny_bert_config(64), VisualConfig(feature_dim=12, **visual)).eval()


def test_from_pretrained_text_loads_checkpoint_weights(minilm_checkpoint):
    path = minilm_checkpoint
    from safetensors.torch import load_file

    model = SingleStreamEncoder.from_pretrained_text(path, VisualConfig(feature_dim=8, box_dims=7))
    reference = load_file(str(path / "model.safetensors"))
    state = model.bert.state_dict()
    compared = 0
    for key, value in reference.items():
        if key.startswith(("embeddings.", "encoder.", "pooler.")) and key in state:
            assert torch.equal(state[key], value), key
            compared += 1
    assert compared >= 100  # every embedding, encoder and pooler tensor
    assert model.hidden_size == 384 and model.config.num_hidden_layers == 6
    # the text side is BERT: with every region masked out, text outputs equal BertModel's
    batch = _batch(dim=8, box_dims=7, regions=3)
    batch["region_mask"][:] = False
    model.eval()
    with torch.no_grad():
        ours = model(**batch).text
        theirs = model.bert(input_ids=batch["input_ids"], attention_mask=batch["text_mask"].long()).last_hidden_state
    keep = batch["text_mask"]
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_outputs():
    model = _model()
    batch = _batch()
    with torch.no_grad():
        full = model(**batch)
        one = {k: v[1:2, : int(batch["text_mask"][1].sum())] if k in ("input_ids", "text_mask", "token_regions")
               else v[1:2] for k, v in batch.items()}
        alone = model(**one)
    t = int(batch["text_mask"][1].sum())
    torch.testing.assert_close(full.text[1, :t], alone.text[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.regions[1], alone.regions[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.pooled[1], alone.pooled[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["shared", "index"])
def test_region_order(positions):
    """Shared positions: permuting regions permutes outputs; index positions: it does not."""
    model = _model(region_positions=positions)
    batch = _batch()
    batch["region_mask"][:] = True
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = dict(batch, region_features=batch["region_features"][:, perm],
                    region_boxes=batch["region_boxes"][:, perm])
    with torch.no_grad():
        a, b = model(**batch), model(**shuffled)
    same = torch.allclose(a.regions[:, perm], b.regions, atol=1e-5)
    assert same == (positions == "shared")


def test_label_tokens_get_region_spatial_embedding():
    model = _model()
    batch = _batch()
    batch["token_regions"][0, 2] = 1
    moved = dict(batch, region_boxes=batch["region_boxes"].clone())
    moved["region_boxes"][0, 1] += 0.3
    with torch.no_grad():
        emb_a = model(**batch).sequence
        emb_b = model(**moved).sequence
    assert not torch.allclose(emb_a[0, 2], emb_b[0, 2])
    off = _model(label_spatial=False)
    off.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain = off(**batch).text
        unlinked = model(**dict(batch, token_regions=torch.full_like(batch["token_regions"], -1))).text
    torch.testing.assert_close(plain, unlinked)


def test_image_token_and_gradients():
    model = _model(image_token=True, box_dims=7).train()
    batch = _batch(box_dims=7)
    out = model(**batch)
    assert out.image.shape == (2, 32) and out.regions.shape == (2, 4, 32) and out.text.shape == (2, 6, 32)
    (out.regions.pow(2).sum() + out.pooled.sum()).backward()
    for name in ("feature_proj.0.weight", "box_proj.0.weight", "bert.embeddings.word_embeddings.weight",
                 "bert.encoder.layer.0.attention.self.query.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_too_many_positions_is_an_error():
    torch.manual_seed(0)
    model = SingleStreamEncoder(tiny_bert_config(64, max_position_embeddings=8),
                                VisualConfig(feature_dim=12, region_positions="index"))
    with pytest.raises(ValueError, match="positions"):
        model(**_batch())
