"""vlp export / export-pairs on the embedded default: `vlp synth`, the demo detector, default flags."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

VLP_EXTRACT = [sys.executable, "-c", "from vlp.cli import extract_main; extract_main()"]
FORMATS = {"lxmert-tsv": "feats.tsv", "butd-tsv": "butd.tsv", "volta-lmdb": "volta.lmdb",
           "uniter-imgdb": "uniter", "mmf-npy": "mmf"}


def _cli(entry, args, cwd, monkeypatch):
    """A vlp command in this process (no torch import per command), run in ``cwd``."""
    from click.testing import CliRunner

    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(entry, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_every_format_exports_the_demo_world_with_default_flags(tmp_path, monkeypatch):
    from vlp.cli import build_main, main
    from vlp.schemas import FeatureStore

    _cli(main, ["synth", "world", "--images", "4", "--seed", "2"], tmp_path, monkeypatch)
    extract = subprocess.run(VLP_EXTRACT + ["world/images", "--out", "feats", "--preset", "demo", "--num-cpus", "2",
                                            "--progress", "off"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert extract.returncode == 0, extract.stdout + extract.stderr
    store = FeatureStore(tmp_path / "feats")
    ids = sorted(store.keys())
    for fmt, out in FORMATS.items():
        output = _cli(main, ["export", "feats", "--to", fmt, "--out", out], tmp_path, monkeypatch)
        assert f"exported {len(ids)} record(s)" in output
    # LXMERT: one box count per file; the demo detector keeps 10-100 boxes, so 10 (its min_boxes)
    rows = [line.split("\t") for line in (tmp_path / "feats.tsv").read_text().splitlines()]
    assert sorted(r[0] for r in rows) == ids and all(len(r) == 10 and r[7] == "10" for r in rows)
    for row in rows:
        record = store[row[0]]
        features = np.frombuffer(base64.b64decode(row[9]), dtype=np.float32).reshape(10, -1)
        np.testing.assert_array_equal(features, record.features[:10].astype(np.float32))
    sidecar = json.loads((tmp_path / "feats.tsv.vlp-export.json").read_text())
    assert sidecar["settings"]["num_boxes"] == 10
    assert sidecar["source"]["detector_config_hash"] == store.manifest["detector"]["config_hash"]
    nbb = json.loads((tmp_path / "uniter" / "nbb_th0.2_max100_min10.json").read_text())
    assert sorted(nbb) == [f"{i}.npz" for i in ids]
    assert sorted(p.name for p in (tmp_path / "mmf").glob("*_info.npy")) == [f"{i}_info.npy" for i in ids]
    # the world's captions and questions, for LXMERT: every img_id has features in the TSV
    _cli(build_main, ["import-coco", "world/annotations/captions_train.json", "--out", "caps"], tmp_path, monkeypatch)
    _cli(build_main, ["import-vqa", "world/vqa/v2_OpenEnded_mscoco_train_questions.json",
                      "world/vqa/v2_mscoco_train_annotations.json", "--out", "vqa", "--features", "feats"],
         tmp_path, monkeypatch)
    _cli(main, ["export-pairs", "caps", "vqa", "--to", "lxmert-pretrain", "--out", "mscoco_train.json"],
         tmp_path, monkeypatch)
    data = json.loads((tmp_path / "mscoco_train.json").read_text())
    assert data and {d["img_id"] for d in data} <= set(ids)
    assert all(set(d["sentf"]) <= {"mscoco", "vqa"} for d in data)
    store.close()
