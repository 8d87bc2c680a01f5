"""Config files that are broken or hostile: one ``Error:`` line naming the file and the key,
exit 1, no traceback, nothing written outside the run folder; the typed config's defaults."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from vlp.trainer.config import ConfigError, SourceConfig, StageConfig, TrainConfig, load_config

GOOD = """\
model:
  vocab: {vocab}
  bert: {{hidden: 32, layers: 1, heads: 2}}
  visual: {{feature_dim: 16}}
data:
  features: {root}/features
stages:
  - name: {name}
    pairs: {root}/pairs
    tasks: {{MLM: 1.0}}
    steps: 2
"""


def _vocab(tmp_path):
    from vlp.trainer.toydata import write_vocab

    return write_vocab(tmp_path / "vocab.txt", ["red", "circle"])


def _run(config_path, out):
    from vlp.cli import train_main

    return CliRunner().invoke(train_main, ["pretrain", str(config_path), "--out", str(out), "--device", "cpu"])


def _check_refused(result, *needles):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: "), result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  vocab: x\nstages: [\n  - name: a\n")  # an unclosed flow sequence
    result = _run(path, tmp_path / "run")
    _check_refused(result, f"{path}:", "YAML error")
    line, column = result.output.split(f"{path}:", 1)[1].split(":")[:2]
    assert line.isdigit() and column.isdigit() and int(line) >= 3


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\nstages: []\n")
    result = _run(path, tmp_path / "run")
    _check_refused(result, f"{path}:1:8", "tag", "not allowed")
    assert not marker.exists()


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# caf\u00e9\nmodel: {}\n".encode("latin-1"))
    _check_refused(_run(path, tmp_path / "run"), str(path), "not UTF-8", "line 1")


@pytest.mark.parametrize("text, message", [
    ("stages: {a: {tasks: [MLM]}}\n", "stages must be a list of stages"),
    ("stages:\n  - [MLM, 2]\n", "stages[0] must be a mapping"),
    ("stages:\n  - name: a\n    tasks: [MLM]\n    steps: 1\n    sources: {pairs: x}\n", "stages[0].sources must be a list"),
    ("stages:\n  - name: a\n    tasks: [MLM]\n    steps: 1\n    sources: [[x]]\n", "stages[0].sources[0] must be a mapping"),
    ("- model\n", "the config must be a mapping"),
    ("", "the config must be a mapping"),
    ("model: [vocab]\nstages: []\n", "model must be a mapping"),
    ("data: 3\nstages: []\n", "data must be a mapping"),
])
def test_wrong_shapes_are_one_error_line(tmp_path, text, message):
    vocab = _vocab(tmp_path)
    if not text.startswith(("- ", "model")) and text:
        text = f"model: {{vocab: {vocab}}}\n" + text
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    _check_refused(_run(path, tmp_path / "run"), f"Error: {path}: ", message)


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "a\\b", "", " x"])
def test_stage_names_must_be_safe_folder_names(tmp_path, name):
    vocab = _vocab(tmp_path)
    path = tmp_path / "sub" / "config.yaml"
    path.parent.mkdir()
    path.write_text(GOOD.format(vocab=vocab, root=tmp_path, name=yaml.safe_dump(name).strip().removesuffix("\n...")))
    out = tmp_path / "sub" / "deep" / "run"
    result = _run(path, out)
    _check_refused(result, str(path), "stages[0].name")
    assert not (tmp_path / "escape").exists() and not out.exists()
    with pytest.raises(ConfigError, match=r"stages\[0\]\.name"):
        load_config(path)


def test_typed_config_fills_defaults_in_one_place(tmp_path):
    vocab = _vocab(tmp_path)
    raw = yaml.safe_load(GOOD.format(vocab=vocab, root=tmp_path, name="first"))
    raw["data"]["max_regions"] = 20
    raw["stages"].append({"name": "second", "tasks": {"MLM": 1.0, "ITM": 1.0}, "steps": 3, "seed": 7,
                          "sources": [{"pairs": "a", "max_text_len": 12, "split": ["train", "restval"]},
                                      {"name": "labels", "pairs": "b", "tasks": ["MLM"], "ratio": 0.25}]})
    raw["seed"] = 5
    config = TrainConfig.from_dict(raw, "x.yaml")
    first, second = config.stages
    assert isinstance(first, StageConfig) and first.seed == 5 and second.seed == 7
    assert first.batch_size == StageConfig.batch_size == 32 and first.lr == 1e-4
    (only,) = first.sources
    assert isinstance(only, SourceConfig) and only.name == "pairs"
    assert only.features == f"{tmp_path}/features" and only.max_text_len == 40 and only.max_regions == 20
    a, b = second.sources
    assert (a.name, a.max_text_len, a.split, a.tasks) == ("source1", 12, ("train", "restval"), ())
    assert (b.name, b.tasks, b.ratio, b.max_text_len) == ("labels", ("MLM",), 0.25, 40)
    # the normalised form reads back to the same config
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config
    with pytest.raises(ConfigError, match=r"^x\.yaml: stages\[1\]\.sources\[1\]: ratio must be a positive number"):
        raw["stages"][1]["sources"][1]["ratio"] = "0.5"
        TrainConfig.from_dict(raw, "x.yaml")


def test_config_may_name_a_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no demo-out/ here: the shipped demo config's stores are missing
    result = _run("demo", tmp_path / "run")
    _check_refused(result, "demo.yaml: eval.pairs: demo-out/pairs/coco-captions: no such directory")
    assert not (tmp_path / "run").exists()
    unknown = _run("nonesuch", tmp_path / "run")
    assert unknown.exit_code == 2 and "not a shipped config (demo, " in unknown.output
