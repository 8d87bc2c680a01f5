"""The two-stream (ViLBERT-style) encoder: layout, shapes, masks, every pretraining task,
a finetune task, BERT initialization of the text stream, config checks and round trip, and
the Singh et al. configs' optimiser."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from vlp.schemas.pairs import PairStoreWriter
from vlp.trainer.config import ConfigError, FinetuneConfig, TrainConfig
from vlp.trainer.data import IGNORE, load_tokenizer
from vlp.trainer.model import VisualConfig, tiny_bert_config
from vlp.trainer.tasks import TASKS, PretrainModel, TaskContext, make_tasks, prepare_batch
from vlp.trainer.toydata import tiny_feature_store, write_vocab
from vlp.trainer.two_stream import TwoStreamConfig, TwoStreamEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["a", "red", "blue", "circle", "star", "heart", "near", "the", "what", "color", "is", "it", "shape"]
TINY = {"v_layers": 2, "v_hidden": 16, "v_heads": 2, "v_intermediate": 32, "co_hidden": 24, "co_heads": 2}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("v") / "vocab.txt", WORDS))


def _encoder(tok, seed=0, t_layers=3, options=None, **visual):
    torch.manual_seed(seed)
    vis = VisualConfig(feature_dim=8, box_dims=5, **visual)
    return TwoStreamEncoder(tiny_bert_config(len(tok), hidden=32, layers=t_layers, heads=2), vis,
                            TwoStreamConfig(**{**TINY, **(options or {})}))


def _batch(tok, seed=0):
    from vlp.schemas import vocab

    g = torch.Generator().manual_seed(seed)
    texts = ["a red circle near the star", "a heart", "the star", "a circle"]
    enc = tok(texts, padding=True, return_tensors="pt")
    region_mask = torch.ones(4, 5, dtype=torch.bool)
    region_mask[1, 3:] = False
    objects = torch.full((4, 5), vocab.objects().id("star")).masked_fill(~region_mask, IGNORE)
    return {"input_ids": enc["input_ids"], "text_mask": enc["attention_mask"].bool(),
            "token_regions": torch.full(enc["input_ids"].shape, -1), "image_id": ["a", "b", "c", "d"],
            "pair_id": ["1", "2", "3", "4"], "text": texts, "index": torch.arange(4),
            "region_features": torch.randn(4, 5, 8, generator=g), "region_boxes": torch.rand(4, 5, 5, generator=g),
            "region_mask": region_mask, "objects_id": objects, "attrs_id": objects.clamp(max=399),
            "objects_conf": torch.ones(4, 5), "attrs_conf": torch.ones(4, 5),
            "cls_prob": torch.softmax(torch.randn(4, 5, 1601, generator=g) * 3, -1)}


# -- architecture --------------------------------------------------------------------------

def test_vilbert_base_layout_and_the_order_layers_run(tok):
    # ViLBERT base: co-attention before text layers 6..11 and before visual layers 0..5
    assert TwoStreamConfig().layout(12) == ([6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5])
    model = _encoder(tok).eval()
    assert (model.t_biattention_id, model.v_biattention_id) == ([1, 2], [0, 1])
    assert len(model.text_layers) == 3 and len(model.visual_layers) == 2 and len(model.co_layers) == 2
    order = []
    for name, layers in (("T", model.text_layers), ("V", model.visual_layers), ("C", model.co_layers)):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, tag=f"{name}{i}": order.append(tag))
    with torch.no_grad():
        model(**_batch(tok))
    assert order == ["T0", "C0", "T1", "V0", "C1", "T2", "V1"]
    # an explicit layout: both co-attention blocks after all the text layers
    late = _encoder(tok, options={"t_biattention_id": [3, 3], "v_biattention_id": [1, 2]}).eval()
    order.clear()
    for name, layers in (("T", late.text_layers), ("V", late.visual_layers), ("C", late.co_layers)):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, tag=f"{name}{i}": order.append(tag))
    with torch.no_grad():
        late(**_batch(tok))
    assert order == ["T0", "T1", "T2", "V0", "C0", "V1", "C1"]


@pytest.mark.parametrize("image_token", [False, True])
def test_shapes_and_padding_cannot_change_real_outputs(tok, image_token):
    model = _encoder(tok, image_token=image_token).eval()
    batch = _batch(tok)
    with torch.no_grad():
        out = model(**batch)
        assert out.text.shape == (4, batch["input_ids"].shape[1], 32)
        assert out.regions.shape == (4, 5, 32) and out.pooled.shape == (4, 32)
        assert (out.image is not None) == image_token and (not image_token or out.image.shape == (4, 32))
        # row 1 has 3 real regions and a short text: alone, unpadded, it gives the same outputs
        t = int(batch["text_mask"][1].sum())
        one = {k: (v[1:2, :t] if k in ("input_ids", "text_mask", "token_regions") else v[1:2, :3])
               for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "index"}
        alone = model(**one)
        # and garbage in the padded places changes nothing either
        noisy = dict(batch, region_features=batch["region_features"].clone(), input_ids=batch["input_ids"].clone())
        noisy["region_features"][1, 3:] = 100.0
        noisy["input_ids"][1, t:] = tok.convert_tokens_to_ids("star")
        again = model(**noisy)
    torch.testing.assert_close(out.text[1, :t], alone.text[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.regions[1, :3], alone.regions[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled[1], alone.pooled[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.text[1, :t], out.text[1, :t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.pooled[1], out.pooled[1], rtol=1e-5, atol=1e-5)
    # while the real regions do reach the text stream through the co-attention
    moved = dict(batch, region_features=batch["region_features"].clone())
    moved["region_features"][1, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(**moved).text[1, :t], out.text[1, :t])


def test_image_token_is_the_mean_of_the_regions_that_are_not_masked(tok):
    model = _encoder(tok, image_token=True).eval()
    batch = _batch(tok)
    masked = torch.zeros(4, 5, dtype=torch.bool)
    masked[0, 1] = True
    changed = dict(batch, region_features=batch["region_features"].clone())
    changed["region_features"][0, 1] += 5.0  # (a kept masked region: its input still shows)
    seen = []
    model.visual_feature_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(**batch, region_masked=masked)
        model(**changed, region_masked=masked)
        model(**changed)
    # each forward projects the regions, then the IMG feature, which ignores the masked region
    torch.testing.assert_close(seen[1], seen[3])
    expected = batch["region_features"][0, [0, 2, 3, 4]].mean(0)
    torch.testing.assert_close(seen[1][0], expected)
    assert not torch.allclose(seen[5][0], expected)  # without region_masked: the mean of all


def test_single_stream_visual_options_are_refused(tok):
    from vlp.trainer.two_stream import check_visual

    for name, value in (("visual_clue", True), ("mask_embedding", True), ("geometry", "sinusoidal")):
        visual = VisualConfig(feature_dim=8)
        setattr(visual, name, value)
        with pytest.raises(ValueError, match=f"visual.{name} is a single-stream"):
            check_visual(visual)
    with pytest.raises(ValueError, match="region_positions: shared"):
        _encoder(tok, region_positions="index")


def test_pooled_is_the_product_of_the_two_poolers(tok):
    model = _encoder(tok, image_token=True).eval()
    batch = _batch(tok)
    seen = {}
    model.text_pooler.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))
    model.visual_pooler.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o))
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.pooled, seen["t"] * seen["v"])
    assert (out.pooled >= 0).all()  # ReLU x ReLU, as ViLBERT's
    summed = _encoder(tok, options={"fusion": "sum"}).eval()
    summed.text_pooler.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))
    summed.visual_pooler.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o))
    with torch.no_grad():
        torch.testing.assert_close(summed(**batch).pooled, seen["t"] + seen["v"])


def test_label_tokens_use_region_geometry(tok):
    model = _encoder(tok).eval()
    batch = _batch(tok)
    batch["token_regions"][0, 2] = 4
    moved = dict(batch, region_boxes=batch["region_boxes"].clone())
    moved["region_boxes"][0, 4, :2] += 0.2
    with torch.no_grad():
        a, b = model(**batch), model(**moved)
    assert not torch.allclose(a.text[0, 2], b.text[0, 2])


# -- tasks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_pretraining_task_trains_a_step(tok, name):
    ctx = TaskContext.from_tokenizer(tok)
    spec = [{"name": name, "prob": 0.5}] if name == "IFRS" else [name]
    model = PretrainModel(_encoder(tok, image_token=True), make_tasks(spec), ctx)
    batch = _batch(tok)
    if name == "ITM_HS":  # a hard negative image for every pair
        other = _batch(tok, seed=5)
        batch["negative"] = {k: other[k] for k in ("region_features", "region_boxes", "region_mask", "objects_id",
                                                   "attrs_id", "objects_conf", "attrs_conf", "cls_prob")}
        batch["negative"]["image_id"] = [f"hard{i}" for i in range(4)]
    g = torch.Generator().manual_seed(0)
    prepared = prepare_batch(batch, model.tasks, g, ctx, text_prob=0.5, region_prob=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    total, losses, metrics = model(prepared, g, prepared=True)
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    params = dict(model.named_parameters())
    head = [p for n, p in params.items() if n.startswith(f"heads.{model.tasks[0].name}.")]
    assert head and any(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    # both streams and the co-attention learn from every task
    for key in ("encoder.bert.encoder.layer.0.attention.self.query.weight", "encoder.visual_feature_proj.0.weight",
                "encoder.visual_layers.0.attention.self.query.weight", "encoder.co_layers.0.text_cross.key.weight"):
        assert params[key].grad is not None and params[key].grad.abs().sum() > 0, key
    optimizer.step()
    assert not torch.equal(before["encoder.co_layers.0.text_cross.query.weight"],
                           params["encoder.co_layers.0.text_cross.query.weight"])
    if name == "MOC_KL":  # the KL target (the detector's class distribution) was used
        assert "moc_kl_agree" in metrics and metrics["moc_kl_agree_n"] > 0


def test_moc_kl_is_the_kl_to_the_detector_distribution(tok):
    import torch.nn.functional as F

    ctx = TaskContext.from_tokenizer(tok)
    model = PretrainModel(_encoder(tok, image_token=True), make_tasks(["MLM", "MOC_KL"]), ctx).eval()
    g = torch.Generator().manual_seed(1)
    prepared = prepare_batch(_batch(tok), model.tasks, g, ctx, region_prob=0.5)
    _, losses, _ = model(prepared, g, prepared=True)
    masked = prepared["region_masked"] & prepared["region_mask"].bool()
    with torch.no_grad():
        logits = model.heads["MOC_KL"](model.encode(prepared).regions[masked])
    target = prepared["cls_prob"][masked]
    expected = (target * (target.clamp(min=1e-30).log() - F.log_softmax(logits, -1))).sum(-1).mean()
    torch.testing.assert_close(losses["MOC_KL"].detach(), expected, rtol=1e-4, atol=1e-5)


# -- pipeline: pretrain -> finetune, configs -------------------------------------------------

def _stores(root):
    ids = [f"img{i}" for i in range(16)]
    tiny_feature_store(root / "features", ids, feature_dim=16, max_boxes=6, cls_prob=True)
    write_vocab(root / "vocab.txt", WORDS)
    colors = ["red", "blue"]
    with PairStoreWriter(root / "captions", "caption") as writer:
        for i, image_id in enumerate(ids):
            writer.add({"pair_id": f"c{i}", "image_id": image_id, "text": f"a {colors[i % 2]} shape",
                        "split": "train" if i < 12 else "val"})
    with PairStoreWriter(root / "vqa", "question") as writer:
        for i, image_id in enumerate(ids):
            color = colors[i % 2]
            writer.add({"pair_id": f"q{i}", "image_id": image_id, "split": "train" if i < 12 else "val",
                        "text": "what color is it", "question_id": str(i), "answers": [color],
                        "answer_scores": [1.0], "answer_type": "other", "question_type": "what color"})
    return root


def _model_section(root):
    return {"architecture": "two_stream", "vocab": str(root / "vocab.txt"),
            "bert": {"hidden": 32, "layers": 2, "heads": 2},
            "visual": {"feature_dim": 16, "image_token": True}, "two_stream": dict(TINY)}


def test_pretrain_then_finetune_on_the_two_stream_encoder(tmp_path):
    from vlp.trainer.finetune import finetune
    from vlp.trainer.schedule import run_stages

    root = _stores(tmp_path)
    config = {"model": _model_section(root), "data": {"features": str(root / "features"), "max_text_len": 12},
              "stages": [{"name": "mlm-mim", "pairs": str(root / "captions"), "tasks": {"MLM": 1.0, "MOC_KL": 1.0},
                          "steps": 2, "batch_size": 4, "grad_accum": 2, "betas": [0.9, 0.98], "eps": 1.0e-8,
                          "schedule": "cosine", "warmup_steps": 1, "log_every": 0}]}
    summary = run_stages(config, tmp_path / "pretrain")[0]
    assert summary["end_step"] == 2
    ran = {task for h in summary["history"] for task in h["losses"]}
    assert ran == {"MLM", "MOC_KL"}
    saved = torch.load(tmp_path / "pretrain" / "01-mlm-mim" / "checkpoint-0000002.pt", weights_only=True)
    group = saved["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-8 and group["lr"] == 0.0  # cosine to 0 at the end
    assert any(k.startswith("encoder.co_layers.") for k in saved["model"])
    tuned = FinetuneConfig.from_dict({
        "model": _model_section(root), "data": {"features": str(root / "features"), "max_text_len": 12},
        "task": {"name": "vqa", "pairs": str(root / "vqa")},
        "train": {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "eval_every": 2, "log_every": 0}})
    result = finetune(tuned, tmp_path / "vqa", init=tmp_path / "pretrain")
    assert result["end_step"] == 2 and result["init"]["checkpoint"].endswith("checkpoint-0000002.pt")
    evals = [json.loads(line) for line in (tmp_path / "vqa" / "01-finetune" / "eval.jsonl").read_text().splitlines()]
    assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0 and evals[-1]["n"] == 4
    best = torch.load(tmp_path / "vqa" / "best.pt", weights_only=True)["model"]
    assert {k for k in best if k.startswith("encoder.")} == {k for k in saved["model"] if k.startswith("encoder.")}
    # retrieval: the cross-encoder scores every caption against every image, with a shortlist
    retrieval = FinetuneConfig.from_dict({
        "model": _model_section(root), "data": {"features": str(root / "features"), "max_text_len": 12},
        "task": {"name": "retrieval", "pairs": str(root / "captions"), "negatives": 1, "shortlist": 2},
        "train": {"steps": 1, "batch_size": 4, "eval_every": 0, "log_every": 0}})
    result = finetune(retrieval, tmp_path / "retrieval", init=tmp_path / "pretrain")
    evals = [json.loads(line) for line in (tmp_path / "retrieval" / "01-finetune" / "eval.jsonl").read_text().splitlines()]
    assert result["end_step"] == 1 and evals[-1]["n_images"] == 4 and evals[-1]["shortlist"] == 2
    assert all(0.0 <= evals[-1][k] <= 1.0 for k in ("ir_r1", "tr_r1", "ir_r5", "tr_r5"))


def test_text_stream_from_a_bert_checkpoint(minilm_checkpoint):
    from safetensors.torch import load_file

    encoder = TwoStreamEncoder.build({"text_checkpoint": str(minilm_checkpoint),
                                      "two_stream": {**TINY, "v_layers": 2}},
                                     VisualConfig(feature_dim=8, box_dims=5), tokenizer=None)
    reference = load_file(str(minilm_checkpoint / "model.safetensors"))
    state = encoder.bert.state_dict()
    layers = json.loads((minilm_checkpoint / "config.json").read_text())["num_hidden_layers"]
    assert len(encoder.text_layers) == layers and encoder.hidden_size == 384
    assert encoder.t_biattention_id == list(range(layers - 2, layers)) and encoder.v_biattention_id == [0, 1]
    for key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.LayerNorm.weight", "encoder.layer.0.attention.self.query.weight",
                f"encoder.layer.{layers - 1}.output.dense.weight"):
        assert torch.equal(state[key], reference[key]), key
    # t_layers keeps the checkpoint's first layers
    short = TwoStreamEncoder.build({"text_checkpoint": str(minilm_checkpoint),
                                    "two_stream": {**TINY, "t_layers": 2, "v_layers": 1}},
                                   VisualConfig(feature_dim=8, box_dims=5), tokenizer=None)
    assert len(short.text_layers) == 2 and short.t_biattention_id == [1]
    # a layout past the checkpoint's layers is named before any weight is read
    with pytest.raises(ValueError, match=rf"model.two_stream: t_biattention_id \[{layers}, {layers + 1}\] names text "
                                         rf"layers past the text stream's {layers}"):
        TwoStreamEncoder.build({"text_checkpoint": str(minilm_checkpoint),
                                "two_stream": {**TINY, "t_biattention_id": [layers, layers + 1],
                                               "v_biattention_id": [0, 1]}},
                               VisualConfig(feature_dim=8, box_dims=5), tokenizer=None)
    assert torch.equal(short.bert.state_dict()["encoder.layer.1.attention.self.query.weight"],
                       reference["encoder.layer.1.attention.self.query.weight"])
    out = short(input_ids=torch.tensor([[101, 2054, 102]]), text_mask=torch.ones(1, 3, dtype=torch.bool),
                region_features=torch.randn(1, 4, 8), region_boxes=torch.rand(1, 4, 5),
                region_mask=torch.ones(1, 4, dtype=torch.bool))
    assert out.text.shape == (1, 3, 384) and out.regions.shape == (1, 4, 384)


def test_config_round_trip_and_errors(tmp_path):
    base = {"model": {"architecture": "two_stream", "vocab": "demo", "bert": {"hidden": 32, "layers": 2, "heads": 2},
                      "two_stream": dict(TINY)},
            "data": {"features": "f"}, "stages": [{"pairs": "p", "tasks": ["MLM", "MOC_KL"], "steps": 1}]}
    config = TrainConfig.from_dict(base)
    assert config.model.architecture == "two_stream" and config.model.two_stream == TINY
    again = TrainConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert yaml.safe_load(yaml.safe_dump(config.to_dict())) == config.to_dict()

    def error(**model):
        raw = json.loads(json.dumps(base))
        raw["model"].update(model)
        with pytest.raises(ConfigError) as caught:
            TrainConfig.from_dict(raw, tmp_path / "c.yaml")
        return str(caught.value)

    assert "model.two_stream: unknown key(s): v_hiden" in error(two_stream={"v_hiden": 8})
    assert "v_hidden (10) must be a multiple of v_heads (4)" in error(two_stream={"v_hidden": 10, "v_heads": 4})
    assert "must be as long" in error(two_stream={"t_biattention_id": [1], "v_biattention_id": [0, 1]})
    assert "names visual layers past v_layers (2)" in error(
        two_stream={**TINY, "t_biattention_id": [1], "v_biattention_id": [3]})
    assert "must not decrease" in error(two_stream={"t_biattention_id": [2, 1], "v_biattention_id": [0, 1]})
    # the default layout needs a co-attention block before each of the last v_layers text layers
    assert "give t_biattention_id" in error(two_stream={**TINY, "v_layers": 3})
    assert "options of architecture two_stream" in error(architecture="single_stream")
    assert "region_positions" in error(visual={"region_positions": "index"})
    assert "architecture must be single_stream or lxmert_s or two_stream" in error(architecture="vilbert")
    assert str(tmp_path / "c.yaml") in error(two_stream={"fusion": "concat"})


# -- Singh et al.'s configs ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["singh_vilbert", "singh_mlm"])
def test_singh_configs_state_the_papers_optimiser(name):
    from vlp.trainer.schedule import shipped_configs

    path = shipped_configs()[name]
    config = TrainConfig.from_dict(yaml.safe_load(path.read_text()), path)
    (stage,) = config.stages
    assert stage.betas == (0.9, 0.98) and stage.eps == 1e-8
    assert stage.warmup == 2000 and stage.schedule == "cosine"
    assert stage.batch_size * stage.grad_accum == 480 and stage.grad_accum > 1  # large batch by accumulation
    assert stage.lr == 5e-5
    text = path.read_text()
    assert "arXiv:2004.08744" in text and "paper's stated optimiser" in text
    if name == "singh_vilbert":
        assert config.model.architecture == "two_stream" and "Departures" in text
        assert {t.name for t in make_tasks(stage.tasks)} == {"MLM", "MOC_KL"}
        options = TwoStreamConfig.from_dict(config.model.two_stream)
        assert options.layout(12) == ([6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5])
        assert (options.v_hidden, options.v_heads, options.v_intermediate, options.co_hidden, options.co_heads,
                options.fusion) == (1024, 8, 1024, 1024, 8, "mul")
        assert config.model.visual_config().image_token and config.model.visual_config().box_dims == 5


def test_singh_vilbert_builds_the_vilbert_base_layout_on_a_small_text_stream(tmp_path, tok):
    """The shipped config's model section, text widths shrunk: 12 text layers, 6 visual ones,
    co-attention where ViLBERT has it."""
    from vlp.trainer.schedule import build_encoder, shipped_configs

    raw = yaml.safe_load(shipped_configs()["singh_vilbert"].read_text())
    model = raw["model"]
    model.pop("text_checkpoint")
    model.update(vocab=str(tmp_path / "vocab.txt"), bert={"hidden": 32, "heads": 2})
    model["visual"]["feature_dim"] = 8
    model["two_stream"].update(v_hidden=16, v_heads=2, v_intermediate=32, co_hidden=16, co_heads=2)
    write_vocab(tmp_path / "vocab.txt", WORDS)
    config = TrainConfig.from_dict({**raw, "data": {"features": "f"}})
    encoder = build_encoder(config, tok)
    assert len(encoder.text_layers) == 12 and len(encoder.visual_layers) == 6 and len(encoder.co_layers) == 6
    assert encoder.t_biattention_id == [6, 7, 8, 9, 10, 11] and encoder.v_biattention_id == [0, 1, 2, 3, 4, 5]
    with torch.no_grad():
        out = encoder.eval()(**{k: v for k, v in _batch(tok).items()
                                if k in ("input_ids", "text_mask", "region_features", "region_boxes", "region_mask")})
    assert out.pooled.shape == (4, 32) and out.image.shape == (4, 32)


# -- fuzz: any model.two_stream section is a config or one clear ConfigError ----------------

def test_two_stream_options_fuzz():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = [f.name for f in __import__("dataclasses").fields(TwoStreamConfig)] + ["v_hiden", "layers"]
    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
                       st.text(max_size=5), st.lists(st.integers(-2, 14), max_size=5),
                       st.lists(st.one_of(st.text(max_size=2), st.floats()), max_size=3), st.just({"a": 1}))
    sections = st.one_of(st.dictionaries(st.sampled_from(keys), values, max_size=6), values)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(section=sections)
    def check(section):
        raw = {"model": {"architecture": "two_stream", "vocab": "demo", "bert": {"hidden": 32, "layers": 2},
                         "two_stream": section},
               "data": {"features": "f"}, "stages": [{"pairs": "p", "tasks": ["MLM"], "steps": 1}]}
        try:
            config = TrainConfig.from_dict(raw, "c.yaml")
        except ConfigError as error:
            assert str(error).startswith("c.yaml: model") and "\n" not in str(error)
            return
        options = TwoStreamConfig.from_dict(config.model.two_stream)
        t_ids, v_ids = options.layout(options.t_layers or 2)
        assert len(t_ids) == len(v_ids) >= 1 and max(v_ids) <= options.v_layers

    check()
