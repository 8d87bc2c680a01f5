"""vlp-build web-filter as a run: kill -9 and rerun, Ray Data against in-process, the CLI on the
synthetic world with default flags, train-web-scorer, and a fuzz test of the records reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vlp.builders.web_filter import FilterConfig, web_filter
from vlp.builders.web_filter.inputs import plan_shards, read_shard
from vlp.schemas.pairs import PairStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.synthetic import generate
    from vlp.synthetic.web import web_feature_store

    root = tmp_path_factory.mktemp("wfrun") / "w"
    generate(root, num_images=30, seed=11)
    web_feature_store(root / "web", root / "web-features")
    return root


def _pairs(path) -> list:
    return [dict(p) for p in PairStore(path)]


def _rejected(path) -> list:
    return sorted(Path(path, "rejected.jsonl").read_text().splitlines())


_CHILD = """
import sys, time
from vlp.builders.web_filter import run, FilterConfig
original = run._run_shard
def slow(*args, **kw):
    original(*args, **kw)
    time.sleep(1.0)  # room for the parent to kill between shards (and inside one)
run._run_shard = slow
run.web_filter(sys.argv[1], sys.argv[2], config=FilterConfig(features=sys.argv[3]), engine="local",
               shard_rows=8, progress="off")
"""


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_store(world, tmp_path):
    crawl, features = world / "web", world / "web-features"
    reference = tmp_path / "reference"
    web_filter(crawl, reference, config=FilterConfig(features=str(features)), engine="local", shard_rows=8,
               progress="off")
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(crawl), str(out), str(features)], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(REPO.parent)})
    done = Path(str(out) + ".work") / "done.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not done.exists() or len(done.read_text().splitlines()) < 2):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = len(done.read_text().splitlines())
    shards = len(plan_shards([crawl], 8))
    assert 2 <= finished < shards and not out.exists()
    rerun = web_filter(crawl, out, config=FilterConfig(features=str(features)), engine="local", shard_rows=8,
                       progress="off")
    assert rerun.stats["input_shards"] == shards
    assert _pairs(out) == _pairs(reference)
    assert _rejected(out) == _rejected(reference)
    assert json.loads((out / "manifest.json").read_text())["stats"]["funnel"] == \
        json.loads((reference / "manifest.json").read_text())["stats"]["funnel"]


def test_other_options_start_the_work_afresh(world, tmp_path):
    crawl = world / "web"
    out = tmp_path / "out"
    work = Path(str(out) + ".work")
    web_filter(crawl, out, engine="local", shard_rows=20, progress="off", keep_work=True)
    assert len(work.joinpath("done.jsonl").read_text().splitlines()) == len(plan_shards([crawl], 20))
    first = _pairs(out)
    # same options: every shard is done, nothing is run again, the same store comes out
    web_filter(crawl, out, engine="local", shard_rows=20, progress="off", overwrite=True, keep_work=True)
    assert _pairs(out) == first
    # other options: the earlier shards are not reused
    web_filter(crawl, out, config=FilterConfig(min_side=200), engine="local", shard_rows=20, progress="off",
               overwrite=True)
    assert not work.exists() and len(_pairs(out)) >= len(first)


@pytest.mark.slow
def test_ray_data_engine_matches_the_in_process_one(world, tmp_path, monkeypatch):
    from vlp.builders.web_filter import run

    config = FilterConfig(features=str(world / "web-features"))
    web_filter(world / "web", tmp_path / "local", config=config, engine="local", shard_rows=12, progress="off")

    def not_here(*args, **kw):
        raise AssertionError("the driver must not do this with the ray engine")

    # the Ray workers import their own copy of the module: in the driver, reading a shard or
    # aggregating every survivor in memory would fail
    monkeypatch.setattr(run, "read_shard", not_here)
    monkeypatch.setattr(run, "aggregate", not_here)
    result = web_filter(world / "web", tmp_path / "ray", config=config, engine="ray", num_cpus=2, shard_rows=12,
                        batch_size=16, progress="off")
    import ray

    assert not ray.is_initialized()
    assert result.stats["input_shards"] == len(plan_shards([world / "web"], 12)) > 2
    assert _pairs(tmp_path / "ray") == _pairs(tmp_path / "local")
    assert _rejected(tmp_path / "ray") == _rejected(tmp_path / "local")
    manifest = lambda p: json.loads((p / "manifest.json").read_text())["stats"]  # noqa: E731
    assert manifest(tmp_path / "ray")["funnel"] == manifest(tmp_path / "local")["funnel"]
    reasons = {r for f in manifest(tmp_path / "ray")["funnel"] if f["stage"] == "aggregation" for r in f["reasons"]}
    assert reasons  # the crawl has near copies and shared texts: the shuffles had work to do


@pytest.mark.slow
def test_cli_on_the_synthetic_world_with_default_flags(world, tmp_path):
    from vlp.cli import build_main

    runner = CliRunner()
    result = runner.invoke(build_main, ["web-filter", str(world / "web"), "--out", str(tmp_path / "out"),
                                       "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert "web pairs to" in result.output and "funnel.html" in result.output
    assert len(PairStore(tmp_path / "out")) > 0
    again = runner.invoke(build_main, ["web-filter", str(world / "web"), "--out", str(tmp_path / "out")])
    assert again.exit_code == 1 and again.output.startswith("Error: ") and "--overwrite" in again.output
    assert "Traceback" not in again.output


def test_cli_errors_are_one_line(world, tmp_path):
    from vlp.cli import build_main

    runner = CliRunner()
    bad_model = tmp_path / "m.json"
    bad_model.write_text("{}")
    result = runner.invoke(build_main, ["web-filter", str(world / "web"), "--out", str(tmp_path / "o"), "--features",
                                        str(world / "web-features"), "--model", str(bad_model), "--engine", "local"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "vlp-web-scorer" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(build_main, ["web-filter", str(empty), "--out", str(tmp_path / "o2"), "--engine", "local"])
    assert result.exit_code == 1 and "no records" in result.output
    result = runner.invoke(build_main, ["train-web-scorer", "--out", str(tmp_path / "m2.json")])
    assert result.exit_code == 2


@pytest.mark.slow
def test_train_web_scorer_on_a_world_writes_a_usable_model(world, tmp_path):
    from vlp.builders.web_filter.scorer import WebScorer
    from vlp.cli import build_main

    model = tmp_path / "model.json"
    result = CliRunner().invoke(build_main, ["train-web-scorer", "--world", str(world), "--out", str(model)])
    assert result.exit_code == 0, result.output
    scorer = WebScorer.load(model)
    assert scorer.naturalness.meta["train_positives"] > 0 and 0 < scorer.semantic.threshold <= 0.5
    text = model.read_text()
    assert json.loads(text)["format"] == "vlp-web-scorer" and "pickle" not in text
    out = web_filter(world / "web", tmp_path / "out", config=FilterConfig(features=str(world / "web-features"),
                                                                        model=str(model)),
                     engine="local", progress="off")
    funnel = {f["stage"]: f for f in out.stats["funnel"]}
    assert funnel["naturalness"]["reasons"].get("unnatural", 0) > 0
    assert funnel["semantic"]["reasons"].get("low_score", 0) > 0


_FIELD = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20), st.booleans(),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.binary(max_size=40),
    st.fixed_dictionaries({}, optional={"key": _FIELD, "url": _FIELD, "image_path": _FIELD, "alt": _FIELD,
                                        "title": _FIELD, "surrounding_text": _FIELD, "image": _FIELD}).map(
        lambda d: json.dumps(d).encode()),
), max_size=12))
@example(lines=[b'{"key":0,"image":"\\u0000"}'])  # a NUL byte in the image path
def test_records_reader_never_raises(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "records.jsonl").write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    rows = [row for shard in plan_shards([folder], 5) for row in read_shard(shard)]
    for row in rows:
        assert isinstance(row["key"], str) and row["key"]
        if row.get("_reject"):
            assert row["stage"] == "input" and row["reason"]
        else:
            assert "image_file" in row or "image_bytes" in row
    # and the stages take whatever the reader let through
    from vlp.builders.web_filter.stages import run_all

    processed = run_all([r for r in rows if not r.get("_reject")], FilterConfig(need_noun=False))
    assert all(r.get("_reject") for r in processed)  # no image file exists: all rejected, none raised


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(doc=st.one_of(_JSON, st.fixed_dictionaries({"format": st.just("vlp-web-scorer")}, optional={
    "naturalness": _JSON, "semantic": _JSON})))
def test_model_file_parser_gives_value_errors_only(doc):
    from vlp.builders.web_filter.scorer import WebScorer

    try:
        WebScorer.from_dict(doc)
    except ValueError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from([".json", ".txt", ".jpg"]), st.binary(max_size=60)), max_size=6))
def test_img2dataset_sidecars_never_raise(tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("i2d")
    shard = folder / "00000"
    shard.mkdir()
    for number, (ext, data) in enumerate(files):
        (shard / f"{number % 3:09d}{ext}").write_bytes(data)
    if not any(shard.glob("*.json")):
        (shard / "000000009.json").write_bytes(b"{}")
    rows = [row for s in plan_shards([folder]) for row in read_shard(s)]
    assert all(isinstance(r["key"], str) and r["key"] for r in rows)


@pytest.mark.slow
def test_address_runs_on_a_ray_cluster_started_apart(world, tmp_path, ray_head):
    """The CLI with --address on a Ray head of the test's own (the ray_head fixture)."""
    head = ray_head(num_cpus=1)
    out = tmp_path / "out"
    result = subprocess.run([str(Path(sys.executable).parent / "vlp-build"), "web-filter", str(world / "web"),
                             "--out", str(out), "--address", head.address, "--shard-rows", "20",
                             "--progress", "off"], capture_output=True, text=True, timeout=400, cwd=tmp_path,
                            env=head.env)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = tmp_path / "reference"
    web_filter(world / "web", reference, engine="local", shard_rows=20, progress="off")
    assert _pairs(out) == _pairs(reference) and len(_pairs(out)) > 0
    assert _rejected(out) == _rejected(reference)
    assert head.process.poll() is None  # the driver's exit left the cluster alone
    # the work ran on that cluster: its workers' logs are in the head's temp dir
    assert list(head.temp_dir.glob("session_*/logs/worker-*"))
