"""The captioner network and its decoding: teacher-forced log-probs, greedy / beam / nucleus,
scores, the XE and SCST losses, configs (with a fuzz test), and exact resume through the
training loop on a tiny world."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlp.trainer.captioning.config import CaptionerConfig
from vlp.trainer.captioning.model import (CaptionerModelConfig, CaptionerNet, Tokens, beam_search, decode, greedy,
                                          sample, texts)
from vlp.trainer.config import ConfigError, shipped_vocab
from vlp.trainer.data import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the test machine is shared


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shipped_vocab("demo"))


@pytest.fixture(scope="module")
def net(tokenizer):
    torch.manual_seed(0)
    config = CaptionerModelConfig(feature_dim=8, hidden_size=32, encoder_layers=1, decoder_layers=1, heads=2,
                                  intermediate_size=64, dropout=0.0, max_caption_len=6)
    model = CaptionerNet(config, Tokens.from_tokenizer(tokenizer))
    with torch.no_grad():  # a peaked output so that decodings differ and captions end
        model.out_bias.add_(torch.randn_like(model.out_bias) * 3)
    return model.eval()


def _inputs(batch=3, regions=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, regions, 8, generator=g)
    boxes = torch.rand(batch, regions, 5, generator=g)
    mask = torch.ones(batch, regions, dtype=torch.bool)
    mask[0, 2:] = False
    return features, boxes, mask


def _sum_log_prob(net, memory, pad, seqs):
    log_probs, keep = net.token_log_probs(memory, pad, seqs)
    return log_probs.sum(1), keep.sum(1)


def test_teacher_forced_log_probs_match_step_by_step_decoding(net):
    features, boxes, mask = _inputs()
    memory, pad = net.encode(features, boxes, mask)
    seqs = greedy(net, memory, pad)
    assert (seqs[:, 0] == net.tokens.bos).all()
    log_probs, keep = net.token_log_probs(memory, pad, seqs)
    for t in range(1, seqs.shape[1]):  # the greedy token is the argmax of the prefix's logits
        step = torch.log_softmax(net.logits(memory, pad, seqs[:, :t])[:, -1], -1)
        picked = step.gather(1, seqs[:, t:t + 1]).squeeze(1)
        assert torch.allclose(log_probs[:, t - 1][keep[:, t - 1]], picked[keep[:, t - 1]], atol=1e-5)
        if t <= net.config.max_caption_len:  # after max_caption_len tokens the end token is forced
            assert (step.argmax(-1)[keep[:, t - 1]] == seqs[keep[:, t - 1], t]).all()
    # padding regions do not change a row's captions
    cut = greedy(net, *net.encode(features[:1, :2], boxes[:1, :2], mask[:1, :2]))
    assert torch.equal(cut[0, :seqs.shape[1]][cut[0] != net.tokens.pad], seqs[0][seqs[0] != net.tokens.pad])


def test_scores_are_mean_token_log_probs_and_specials_are_never_generated(net, tokenizer):
    features, boxes, mask = _inputs()
    seqs, scores = decode(net, features, boxes, mask, decoding="greedy")
    memory, pad = net.encode(features, boxes, mask)
    total, count = _sum_log_prob(net, memory, pad, seqs)
    assert torch.allclose(scores, total / count, atol=1e-6)
    assert (scores <= 0).all()
    banned = set(net.tokens.banned)
    assert not any(t in banned for row in seqs[:, 1:].tolist() for t in row if t != net.tokens.pad)
    assert all(isinstance(t, str) for t in texts(tokenizer, seqs))


def test_beam_of_one_is_greedy_and_beams_come_best_first(net):
    features, boxes, mask = _inputs()
    memory, pad = net.encode(features, boxes, mask)
    g = greedy(net, memory, pad)
    b1 = beam_search(net, memory, pad, beam_size=1)
    assert torch.equal(g, b1[:, :g.shape[1]]) and (b1[:, g.shape[1]:] == net.tokens.pad).all()
    seqs = beam_search(net, memory, pad, beam_size=4, num_captions=3)
    assert seqs.shape[0] == 9
    total, _ = _sum_log_prob(net, memory.repeat_interleave(3, 0), pad.repeat_interleave(3, 0), seqs)
    total = total.view(3, 3)
    assert (total[:, :-1] >= total[:, 1:] - 1e-5).all()  # best first
    for row in range(3):  # distinct beams
        assert len({tuple(s.tolist()) for s in seqs[row * 3:(row + 1) * 3]}) == 3
    with pytest.raises(ValueError, match="at most beam_size"):
        beam_search(net, memory, pad, beam_size=2, num_captions=3)


def test_nucleus_sampling_is_a_function_of_the_uniforms(net):
    features, boxes, mask = _inputs()
    memory, pad = net.encode(features, boxes, mask)
    u = torch.rand(3, 7, generator=torch.Generator().manual_seed(5))
    a, b = sample(net, memory, pad, u, top_p=0.8), sample(net, memory, pad, u, top_p=0.8)
    assert torch.equal(a, b)
    # a tiny nucleus keeps only the most likely token: greedy
    g = greedy(net, memory, pad)
    tiny = sample(net, memory, pad, u, top_p=1e-6)
    assert torch.equal(tiny[:, :g.shape[1]], g)
    # a row's caption does not depend on the other rows of the batch
    alone = sample(net, memory[1:2], pad[1:2], u[1:2], top_p=0.8)
    assert torch.equal(alone[0][alone[0] != net.tokens.pad], a[1][a[1] != net.tokens.pad])
    # full sampling with many draws visits more than the greedy caption
    many = sample(net, memory[:1].expand(40, -1, -1), pad[:1].expand(40, -1),
                  torch.rand(40, 7, generator=torch.Generator().manual_seed(9)), top_p=1.0)
    assert len({tuple(r.tolist()) for r in many}) > 1
    with pytest.raises(ValueError, match="greedy decoding gives one caption"):
        decode(net, features, boxes, mask, decoding="greedy", num_captions=2)


def test_xe_loss_is_the_cross_entropy_of_the_next_token(net, tokenizer):
    from vlp.trainer.captioning.task import CaptionXE

    features, boxes, mask = _inputs(batch=2)
    enc = tokenizer(["a red circle", "two blue stars on a plain background"], padding=True, return_tensors="pt")
    batch = {"region_features": features, "region_boxes": boxes, "region_mask": mask,
             "input_ids": enc["input_ids"], "text_mask": enc["attention_mask"].bool()}
    with torch.no_grad():
        loss, metrics = CaptionXE().compute(net, batch, None, None)
    memory, pad = net.encode(features, boxes, mask)
    log_probs, keep = net.token_log_probs(memory, pad, enc["input_ids"])
    assert loss.item() == pytest.approx(float(-log_probs[keep].mean().detach()), abs=1e-5)
    assert metrics["caption_n"] == int(enc["attention_mask"].sum()) - 2


def test_scst_baseline_is_the_mean_reward_of_the_other_samples(net, tokenizer):
    from vlp.trainer.captioning.task import SCST

    class Rewards:  # reward = number of words: a known, varying reward
        def scores(self, captions, image_ids):
            return [float(len(c)) for c in captions]

    task = SCST(scorer=Rewards(), tokenizer=tokenizer, samples=4)
    features, boxes, mask = _inputs(batch=2)
    batch = {"region_features": features, "region_boxes": boxes, "region_mask": mask, "image_id": ["a", "b"]}
    generator = torch.Generator().manual_seed(3)
    net.train()
    try:
        loss, metrics = task.compute(net, batch, generator, None)
        loss.backward()
    finally:
        net.eval()
        net.zero_grad()
    # recompute from the same draws
    u = torch.rand(8, net.config.max_caption_len + 1, generator=torch.Generator().manual_seed(3))
    memory, pad = net.encode(features, boxes, mask)
    seqs = sample(net, memory.repeat_interleave(4, 0), pad.repeat_interleave(4, 0), u)
    captions = texts(tokenizer, seqs)
    reward = torch.tensor([float(len(c.split())) for c in captions]).view(2, 4)
    assert metrics["scst_reward"] == pytest.approx(float(reward.mean()))
    advantage = reward - (reward.sum(1, keepdim=True) - reward) / 3
    log_probs, keep = net.token_log_probs(memory.repeat_interleave(4, 0), pad.repeat_interleave(4, 0), seqs)
    expected = -(advantage.view(-1, 1) * log_probs).sum() / keep.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def _config(**changes) -> dict:
    config = {"model": {"preset": "tiny", "feature_dim": 32}, "data": {"pairs": "p", "features": "f"},
              "xe": {"steps": 10}, "scst": {"steps": 5, "samples": 3}}
    config.update(changes)
    return config


def test_config_defaults_presets_and_errors():
    config = CaptionerConfig.from_dict(_config())
    assert config.model.hidden_size == 64 and config.model.feature_dim == 32
    assert config.scst_options["samples"] == 3 and [s.name for s in config.stages] == ["xe", "scst"]
    assert config.data.train_split == ("train",) and config.eval.decoding == "greedy"
    default = CaptionerConfig.from_dict({**_config(), "model": {}})
    assert (default.model.hidden_size, default.model.encoder_layers, default.model.decoder_layers) == (512, 3, 3)
    again = CaptionerConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    bad = [({"model": {"preset": "huge"}}, "model.preset"), ({"model": {"preset": []}}, "model.preset"),
           ({"scst": {"steps": 5, "samples": 1}}, "scst.samples"),
           ({"xe": {"steps": 5, "epochs": 1}}, "xe: give a stage either"), ({"eval": {"decoding": "nucleus"}},
                                                                           "eval: decoding"),
           ({"model": {"hidden_size": 30, "heads": 4}}, "multiple of heads"), ({"extra": 1}, "unknown key"),
           ({"data": {"pairs": "p"}}, "data: features is required")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            CaptionerConfig.from_dict(_config(**change), "cap.yaml")


leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.floats(allow_nan=True), st.text(max_size=5))
value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=8)
keys = st.sampled_from(["model", "data", "xe", "scst", "eval", "seed", "preset", "vocab", "steps", "samples",
                        "hidden_size", "heads", "pairs", "features", "lr", "decoding", "train_split", "x"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(value, st.dictionaries(keys, st.one_of(value, st.dictionaries(keys, value, max_size=4)),
                                        max_size=6)), st.booleans())
def test_any_config_data_is_a_config_or_a_config_error(data, merge):
    if merge and isinstance(data, dict):  # bad values inside an otherwise good config reach the deeper checks
        good = _config()
        data = {**good, **{k: {**good[k], **v} if isinstance(v, dict) and isinstance(good.get(k), dict) else v
                           for k, v in data.items()}}
    try:
        CaptionerConfig.from_dict(data, "fuzz.yaml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.yaml")


def test_shipped_captioner_configs_parse():
    from vlp.trainer.captioning.config import load_captioner_config, shipped_captioner_configs

    shipped = shipped_captioner_configs()
    assert set(shipped) == {"captioner", "captioner-demo"}
    default = load_captioner_config(shipped["captioner"])
    assert (default.model.hidden_size, default.model.encoder_layers, default.model.decoder_layers) == (512, 3, 3)
    assert default.scst_options["samples"] == 5 and default.data.train_split == ("train", "restval")
    demo = load_captioner_config(shipped["captioner-demo"])
    assert demo.preset == "tiny" and demo.data.pairs == "demo-out/pairs/coco-captions" and demo.scst is not None
