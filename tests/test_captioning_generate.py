"""vlp-build generate-captions: generated pairs with score and generator, decoding options,
--filter, exactly-once resume (a stop, a torn line, a real kill -9 of a Ray run), refused
setting changes, and clean errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vlp.cli import build_main
from vlp.schemas.pairs import PairStore
from vlp.trainer.captioning.generate import (CAPTIONS_FILE, GenerateError, GenerateSettings, generate_captions,
                                             work_folder)

NUM_IMAGES = 30

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the test machine is shared


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """A random-init tiny captioner run folder (captioner.pt + vocab.txt) and a feature store."""
    import shutil

    from vlp.schemas.shards import sha256_file
    from vlp.trainer.captioning.config import CaptionerConfig
    from vlp.trainer.captioning.model import CaptionerModelConfig
    from vlp.trainer.captioning.train import MODEL_FILE, VOCAB_FILE, build_net, save_model
    from vlp.trainer.config import shipped_vocab
    from vlp.trainer.data import load_tokenizer
    from vlp.trainer.toydata import tiny_feature_store

    root = tmp_path_factory.mktemp("captioner")
    shutil.copyfile(shipped_vocab("demo"), root / VOCAB_FILE)
    tokenizer = load_tokenizer(root / VOCAB_FILE)
    config = CaptionerModelConfig(feature_dim=8, hidden_size=32, encoder_layers=1, decoder_layers=1, heads=2,
                                  intermediate_size=64, dropout=0.0, max_caption_len=8)
    net = build_net(config, tokenizer, seed=0)
    with torch.no_grad():
        net.out_bias.add_(torch.randn(net.out_bias.shape, generator=torch.Generator().manual_seed(0)) * 3)
        net.out_bias[tokenizer.sep_token_id] += 2.0  # captions end
    full = CaptionerConfig.from_dict({"model": {"preset": "tiny", "feature_dim": 8}, "data": {"pairs": "p",
                                      "features": "f"}, "xe": {"steps": 1}})
    save_model(root / MODEL_FILE, net, full, "xe", 1)
    tiny_feature_store(root / "features", [f"img{i:03d}" for i in range(NUM_IMAGES)], feature_dim=8)
    return root, root / "features", sha256_file(root / MODEL_FILE)


def _rows(store) -> dict:
    return {p["pair_id"]: p for p in PairStore(store)}


def test_generated_pairs_have_scores_and_the_generator(captioner, tmp_path):
    model, features, sha = captioner
    out = tmp_path / "ccg"
    stats = generate_captions(model, features, out, GenerateSettings(num_workers=0, num_captions=2, batch_size=7,
                                                                      chunk_size=8))
    assert stats["complete"] and stats["pairs"] == 2 * NUM_IMAGES and stats["captioned_now"] == NUM_IMAGES
    store = PairStore(out)
    assert store.kind == "generated" and len(store) == 2 * NUM_IMAGES
    rows = _rows(out)
    assert set(rows) == {f"img{i:03d}#g{k}" for i in range(NUM_IMAGES) for k in range(2)}
    first = rows["img000#g0"]
    assert first["image_id"] == "img000" and first["split"] == "train" and first["source"] == "generated"
    assert first["generator"] == f"vlp-captioner sha256={sha} decoding=nucleus top_p=0.8 seed=0 num_captions=2"
    assert all(-50 < r["score"] <= 0 for r in rows.values())
    assert any(r["text"] for r in rows.values())
    assert not work_folder(out).exists()
    # the same settings with another batching give the same captions (per-image draws)
    again = tmp_path / "again"
    generate_captions(model, features, again, GenerateSettings(num_workers=0, num_captions=2, batch_size=30))
    assert {k: r["text"] for k, r in _rows(again).items()} == {k: r["text"] for k, r in rows.items()}
    assert PairStore(out).image_ids() == PairStore(again).image_ids()


def test_decoding_options_and_filter(captioner, tmp_path):
    model, features, _ = captioner
    generate_captions(model, features, tmp_path / "g", GenerateSettings(num_workers=0, decoding="greedy"))
    generate_captions(model, features, tmp_path / "b", GenerateSettings(num_workers=0, decoding="beam", beam_size=3,
                                                                        num_captions=3))
    generate_captions(model, features, tmp_path / "n", GenerateSettings(num_workers=0, top_p=1e-6))
    greedy, beam, tiny = _rows(tmp_path / "g"), _rows(tmp_path / "b"), _rows(tmp_path / "n")
    assert len(greedy) == NUM_IMAGES and len(beam) == 3 * NUM_IMAGES
    assert "decoding=beam beam_size=3 num_captions=3" in beam["img000#g0"]["generator"]
    for i in range(NUM_IMAGES):
        key = f"img{i:03d}"
        # a tiny nucleus is greedy; an image's beams are distinct captions
        assert tiny[f"{key}#g0"]["text"] == greedy[f"{key}#g0"]["text"]
        texts = [beam[f"{key}#g{k}"]["text"] for k in range(3)]
        assert len(set(texts)) >= 2 or texts[0] == ""
    scores = sorted(r["score"] for r in greedy.values())
    cut = scores[len(scores) // 2]
    stats = generate_captions(model, features, tmp_path / "f", GenerateSettings(num_workers=0, decoding="greedy",
                                                                                min_score=cut))
    kept = _rows(tmp_path / "f")
    assert stats["filtered_out"] == sum(s < cut for s in scores) and len(kept) == sum(s >= cut for s in scores)
    assert all(r["score"] >= cut for r in kept.values())
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["stats"]["filtered_out"] == stats["filtered_out"]


def test_stopped_and_torn_runs_resume_with_every_image_exactly_once(captioner, tmp_path):
    model, features, _ = captioner
    generate_captions(model, features, tmp_path / "full", GenerateSettings(num_workers=0))
    full = _rows(tmp_path / "full")
    out = tmp_path / "ccg"
    settings = GenerateSettings(num_workers=0, chunk_size=4, batch_size=4)
    seen = []
    stats = generate_captions(model, features, out, settings, on_row=seen.append, should_stop=lambda: len(seen) >= 9)
    assert not stats["complete"] and stats["remaining"] == NUM_IMAGES - 12 and not out.exists()
    lines = (work_folder(out) / CAPTIONS_FILE).read_text().splitlines()
    assert len(lines) == 12
    with open(work_folder(out) / CAPTIONS_FILE, "a") as handle:  # a kill in the middle of a line
        handle.write('{"image_id": "img020", "captions": [{"te')
    stats = generate_captions(model, features, out, settings)
    assert stats["complete"] and stats["already_captioned"] == 12 and stats["captioned_now"] == NUM_IMAGES - 12
    rows = _rows(out)
    assert len(rows) == NUM_IMAGES and sorted(r["image_id"] for r in rows.values()) == sorted(
        r["image_id"] for r in full.values())
    assert {k: r["text"] for k, r in rows.items()} == {k: r["text"] for k, r in full.items()}


def test_a_rerun_with_other_settings_is_refused(captioner, tmp_path):
    model, features, _ = captioner
    out = tmp_path / "ccg"
    generate_captions(model, features, out, GenerateSettings(num_workers=0), should_stop=lambda: True)
    assert work_folder(out).is_dir()
    with pytest.raises(GenerateError, match="top_p=0.8 .* -> .*top_p=0.5"):
        generate_captions(model, features, out, GenerateSettings(num_workers=0, top_p=0.5))
    stats = generate_captions(model, features, out, GenerateSettings(num_workers=0, top_p=0.5, overwrite=True))
    assert stats["complete"] and "top_p=0.5" in PairStore(out)[0]["generator"]


def test_cli_errors_are_one_line(captioner, tmp_path):
    model, features, _ = captioner
    runner = CliRunner()
    result = runner.invoke(build_main, ["generate-captions", "--model", str(features), "--features", str(features),
                                        "--out", str(tmp_path / "x"), "--num-workers", "0"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "captioner.pt" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captioner.pt").write_bytes(b"not a torch file")
    (bad / "vocab.txt").write_text("[PAD]\n")
    result = runner.invoke(build_main, ["generate-captions", "--model", str(bad), "--features", str(features),
                                        "--out", str(tmp_path / "x"), "--num-workers", "0"])
    assert result.exit_code == 1 and "Error: " in result.output and "captioner" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(build_main, ["generate-captions", "--model", str(model), "--features", str(features),
                                        "--out", str(tmp_path / "x"), "--decoding", "greedy", "--num-captions", "2"])
    assert result.exit_code == 2 and "one caption per image" in result.output
    result = runner.invoke(build_main, ["generate-captions", "--model", str(model), "--features", str(features),
                                        "--out", str(tmp_path / "ok"), "--num-workers", "0", "--progress", "off",
                                        "--decoding", "greedy"])
    assert result.exit_code == 0, result.output
    assert f"Wrote {NUM_IMAGES} generated pairs" in result.output
    result = runner.invoke(build_main, ["generate-captions", "--model", str(model), "--features", str(features),
                                        "--out", str(tmp_path / "ok"), "--num-workers", "0"])
    assert result.exit_code == 1 and "already holds a pair store" in result.output


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n"))
    except OSError:
        return 0


@pytest.mark.slow
def test_kill_9_of_a_ray_run_then_rerun_captions_every_image_exactly_once(captioner, tmp_path):
    model, features, _ = captioner
    out = tmp_path / "ccg"
    command = [str(Path(sys.executable).with_name("vlp-build")), "generate-captions", "--model", str(model),
               "--features", str(features), "--out", str(out), "--num-workers", "2", "--num-cpus", "2",
               "--chunk-size", "2", "--batch-size", "2", "--progress", "lines", "--num-captions", "2"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    captions = work_folder(out) / CAPTIONS_FILE
    try:
        deadline = time.time() + 240
        while _lines(captions) < 6:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.time() < deadline, "no captions written in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        process.wait()
    before = _lines(captions)
    assert 6 <= before < NUM_IMAGES and not out.exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{NUM_IMAGES - before} images captioned now, {before} earlier" in rerun.stdout
    rows = list(PairStore(out))
    assert len(rows) == 2 * NUM_IMAGES
    per_image = {}
    for row in rows:
        per_image.setdefault(row["image_id"], []).append(row["pair_id"])
    assert sorted(per_image) == [f"img{i:03d}" for i in range(NUM_IMAGES)]
    assert all(len(v) == 2 for v in per_image.values())


def test_a_model_that_does_not_fit_is_one_error_line(captioner, tmp_path):
    import shutil

    from vlp.trainer.captioning.train import MODEL_FILE, VOCAB_FILE
    from vlp.trainer.toydata import tiny_feature_store

    model, features, _ = captioner
    other = tiny_feature_store(tmp_path / "f16", ["a", "b"], feature_dim=16)
    runner = CliRunner()
    result = runner.invoke(build_main, ["generate-captions", "--model", str(model), "--features", str(other.root),
                                        "--out", str(tmp_path / "x"), "--num-workers", "0"])
    assert result.exit_code == 1 and "16-d features" in result.output and "reads 8-d" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copyfile(Path(model) / VOCAB_FILE, broken / VOCAB_FILE)
    state = torch.load(Path(model) / MODEL_FILE, weights_only=True)
    state["model_config"]["no_such_field"] = 1
    torch.save(state, broken / MODEL_FILE)
    result = runner.invoke(build_main, ["generate-captions", "--model", str(broken), "--features", str(features),
                                        "--out", str(tmp_path / "x"), "--num-workers", "1"])
    assert result.exit_code == 1 and "do not fit" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.generating").exists()


junk_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.sampled_from(["image_id", "captions", "text",
                                                                                   "score", "error", "x"]),
                                                                  inner, max_size=3)), max_leaves=6)
junk_line = st.one_of(junk_value.map(lambda v: json.dumps(v).encode() + b"\n"),
                      st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ") + b"\n"))


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(junk_line, min_size=1, max_size=4))
@example([b'{"image_id": ["img028"]}\n', b'{"image_id": "img029", "captions": 5}\n'])
@example([b'{"image_id": "img029", "captions": [{"text": "a"}]}\n', b'[1, 2]\n', b'\xff\xfe\n'])
def test_junk_lines_in_the_work_file_never_break_a_rerun(captioner, tmp_path_factory, lines):
    model, features, _ = captioner
    out = tmp_path_factory.mktemp("junk") / "ccg"
    settings_ = GenerateSettings(num_workers=0, decoding="greedy", chunk_size=10)
    seen = []
    generate_captions(model, features, out, settings_, on_row=seen.append, should_stop=lambda: len(seen) >= 5)
    with open(work_folder(out) / CAPTIONS_FILE, "ab") as handle:
        handle.write(b"".join(lines))
    stats = generate_captions(model, features, out, settings_)
    assert stats["complete"]
    assert sorted(p["image_id"] for p in PairStore(out)) == [f"img{i:03d}" for i in range(NUM_IMAGES)]


@pytest.mark.slow
def test_ctrl_c_stops_with_130_and_the_rerun_finishes(captioner, tmp_path):
    model, features, _ = captioner
    out = tmp_path / "ccg"
    command = [str(Path(sys.executable).with_name("vlp-build")), "generate-captions", "--model", str(model),
               "--features", str(features), "--out", str(out), "--num-workers", "0", "--chunk-size", "1",
               "--batch-size", "1", "--decoding", "beam", "--beam-size", "3", "--progress", "off"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    captions = work_folder(out) / CAPTIONS_FILE
    deadline = time.time() + 240
    while _lines(captions) < 1:
        assert process.poll() is None, process.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output
    assert "rerun the same command to continue" in output and "Traceback" not in output
    assert 1 <= _lines(captions) < NUM_IMAGES
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and len(PairStore(out)) == NUM_IMAGES, rerun.stdout + rerun.stderr
