import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlp import cli
from vlp.demo import random_records
from vlp.pipeline.import_features import write_tsv

COMMANDS = [
    (cli.main, []), (cli.main, ["inspect"]), (cli.main, ["import"]), (cli.main, ["import", "tsv"]),
    (cli.main, ["import", "pickled-lmdb"]), (cli.main, ["import", "mmf-npy"]), (cli.main, ["demo"]), (cli.main, ["synth"]),
    (cli.main, ["train-detector"]),
    (cli.extract_main, []), (cli.build_main, []), (cli.train_main, []),
]


@pytest.mark.parametrize("command, args", COMMANDS)
def test_help_of_every_command(command, args):
    result = CliRunner().invoke(command, args + ["--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")
    # every option a command declares is documented in its help
    sub = command
    for name in args:
        sub = sub.commands[name]
    for param in sub.params:
        if param.param_type_name == "option" and not param.hidden:
            assert param.opts[-1] in result.output
            if param.help is None and param.name not in ("help", "version"):
                pytest.fail(f"option {param.opts} of {args} has no help text")


def test_console_scripts_are_installed():
    bin_dir = Path(sys.executable).parent  # the environment vlp is installed in
    for script in ("vlp", "vlp-extract", "vlp-build", "vlp-train"):
        result = subprocess.run([str(bin_dir / script), "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "Usage:" in result.stdout, script


def test_unknown_option_fails_clearly():
    result = CliRunner().invoke(cli.main, ["inspect", "--bogus", "x"])
    assert result.exit_code == 2
    assert "No such option '--bogus'" in result.output


def test_import_then_inspect(tmp_path):
    records = list(random_records(12, seed=1))
    write_tsv(records, tmp_path / "f.tsv")
    runner = CliRunner()
    out = tmp_path / "s"
    result = runner.invoke(cli.main, ["import", "tsv", str(tmp_path / "f.tsv"), "--out", str(out),
                                      "--format", "arrow", "--shard-size", "5"])
    assert result.exit_code == 0, result.output
    assert "imported 12 record(s)" in result.output
    again = runner.invoke(cli.main, ["import", "tsv", str(tmp_path / "f.tsv"), "--out", str(out)])
    assert again.exit_code == 1 and "already holds a feature store" in again.output
    result = runner.invoke(cli.main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "records      12 in 3 shard(s)" in result.output and "checked      12 record(s): OK" in result.output
    result = runner.invoke(cli.main, ["inspect", str(out), "--json"])
    assert json.loads(result.output)["ok"] is True
    result = runner.invoke(cli.main, ["inspect", str(out), records[4].image_id])
    assert result.exit_code == 0
    assert f"num_boxes    {records[4].num_boxes}" in result.output
    assert "features     float16" in result.output
    result = runner.invoke(cli.main, ["inspect", str(out), "missing-id"])
    assert result.exit_code == 1 and "'missing-id' is not in the feature store" in result.output


def test_inspect_exit_status_on_corruption(tmp_path):
    write_tsv(list(random_records(4, seed=2)), tmp_path / "f.tsv")
    runner = CliRunner()
    runner.invoke(cli.main, ["import", "tsv", str(tmp_path / "f.tsv"), "-o", str(tmp_path / "s")])
    shard = tmp_path / "s" / "shard-00000.lmdb"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = runner.invoke(cli.main, ["inspect", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "ERROR        shard-00000.lmdb: sha256" in result.output


def test_pickled_lmdb_requires_trust_flag(tmp_path):
    (tmp_path / "src").mkdir()
    result = CliRunner().invoke(cli.main, ["import", "pickled-lmdb", str(tmp_path / "src"),
                                           "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--trust-pickle" in result.output


def test_malformed_tsv_error_names_the_line(tmp_path):
    (tmp_path / "f.tsv").write_text("a\tb\tc\n")
    result = CliRunner().invoke(cli.main, ["import", "tsv", str(tmp_path / "f.tsv"), "-o", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "f.tsv:1: 3 tab-separated columns; expected 10" in result.output


@pytest.mark.slow
def test_demo_writes_report(tmp_path):
    out = tmp_path / "d"
    result = CliRunner().invoke(cli.main, ["demo", "--out", str(out), "--images", "8"])
    assert result.exit_code == 0, result.output
    report = (out / "report.txt").read_text()
    assert "12 images (8 synthetic, seed 123; 4 scikit-image photos) + 1 broken file(s)" in report
    assert "checked      12 record(s): OK" in report
    assert "errors.jsonl web/truncated.jpg: truncated file" in report
    assert "vlp-extract pipeline: 1 cpu worker(s)" in report
    assert "12 objects_labels pairs" in report and "40 caption pairs; all 40 pairs have features" in report
    assert "8 vg_phrases pairs; all 8 pairs have features" in report and "12 hard_negatives pairs" in report
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_images"] == 8 and scores["num_gt"] > 8
    assert scores["attribute_accuracy"] > 0.8 and scores["mAP"] > 0.3  # the shipped demo detector, unseen images
    page = (out / "report.html").read_text()
    for name in ("labels.png", "boxes_per_image.png", "detections-world-1.png", "detections-photos-astronaut.png"):
        assert (out / "figures" / name).is_file() and f"figures/{name}" in page
    from vlp.schemas import FeatureStore
    store = FeatureStore(out / "features")
    assert len(store) == 12 and store.feature_dim == 384 and store.manifest["detector"]["preset"] == "demo"
