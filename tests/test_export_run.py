"""vlp export: the shared run (atomic result, kill, errors.jsonl, sidecar, options, CLI)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from vlp.exporters import ExportError, export, resolve_options
from vlp.exporters.common import IdMap, RecordIssue, image_id_as
from vlp.exporters.mmf import relative_file
from vlp.exporters.tsv import _check_text_id
from vlp.schemas import FeatureStore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from vlp.trainer.toydata import tiny_feature_store

    root = tmp_path_factory.mktemp("export-run") / "store"
    tiny_feature_store(root, [str(i) for i in range(1, 13)], feature_dim=8, min_boxes=10, max_boxes=40,
                       cls_prob=False)
    return root


_KILL_AFTER_3 = """
import os, signal, sys
from vlp.exporters import export
from vlp.exporters.{module} import {cls} as F
write, seen = F.write, []
def dying_write(self, record):
    write(self, record)
    seen.append(record.image_id)
    if len(seen) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
F.write = dying_write
export(sys.argv[1], sys.argv[2], "{fmt}", progress="off", overwrite=True, max_boxes={max_boxes})
"""


@pytest.mark.parametrize("fmt, module, cls, name", [
    ("lxmert-tsv", "tsv", "LxmertTsv", "f.tsv"), ("volta-lmdb", "volta", "VoltaLmdb", "f.lmdb"),
    ("mmf-npy", "mmf", "MmfNpy", "mmf")])
def test_a_killed_export_leaves_nothing_and_the_next_run_completes(store, tmp_path, fmt, module, cls, name):
    out = tmp_path / name
    script = _KILL_AFTER_3.format(module=module, cls=cls, fmt=fmt, max_boxes=20 if fmt == "lxmert-tsv" else None)
    result = subprocess.run([sys.executable, "-c", script, str(store), str(out)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()  # no half-written result under the target's name
    assert (tmp_path / (name + ".partial")).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name + ".partial"]
    stats = export(store, out, fmt, progress="off", **({"max_boxes": 20} if fmt == "lxmert-tsv" else {}))
    assert stats.exported == 12
    assert not (tmp_path / (name + ".partial")).exists()
    sidecar = out.with_name(name + ".vlp-export.json") if fmt == "lxmert-tsv" else out / "vlp-export.json"
    assert json.loads(sidecar.read_text())["complete"] is True


def test_a_killed_overwrite_keeps_the_previous_export(store, tmp_path):
    out = tmp_path / "f.tsv"
    export(store, out, "lxmert-tsv", max_boxes=20, progress="off")
    before = out.read_bytes()
    script = _KILL_AFTER_3.format(module="tsv", cls="LxmertTsv", fmt="lxmert-tsv", max_boxes=5)
    subprocess.run([sys.executable, "-c", script, str(store), str(out)], capture_output=True)
    assert out.read_bytes() == before


def test_existing_output_is_refused_unless_overwrite(store, tmp_path):
    out = tmp_path / "v"
    export(store, out, "volta-lmdb", progress="off")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(store, out, "volta-lmdb", progress="off")
    stats = export(store, out, "volta-lmdb", overwrite=True, max_boxes=10, progress="off")
    assert stats.exported == 12 and not (tmp_path / "v.old").exists()
    assert json.loads((out / "vlp-export.json").read_text())["settings"]["max_boxes"] == 10


def test_on_error_stop_writes_nothing(store, tmp_path):
    with pytest.raises(ExportError, match="too few boxes"):
        export(store, tmp_path / "f.tsv", "lxmert-tsv", num_boxes=39, on_error="stop", progress="off")
    assert list(tmp_path.iterdir()) == []


def test_skip_logs_each_record_and_an_export_of_nothing_is_an_error(store, tmp_path):
    stats = export(store, tmp_path / "m", "mmf-npy", min_boxes=30, progress="off")
    counts = {r.image_id: r.num_boxes for r in FeatureStore(store)}
    short = sorted(i for i, n in counts.items() if n < 30)
    assert stats.skipped == len(short) and stats.exported == 12 - len(short)
    rows = [json.loads(line) for line in (tmp_path / "m" / "errors.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in rows) == short
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.name.endswith("_info.npy")) == sorted(
        f"{i}_info.npy" for i in counts if i not in short)
    with pytest.raises(ExportError, match="no record .* could be exported .*too few boxes"):
        export(store, tmp_path / "none", "mmf-npy", min_boxes=999, progress="off")
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()


def test_resolve_options():
    assert resolve_options("lxmert-tsv") == {"num_boxes": "auto"}
    assert resolve_options("lxmert-tsv", max_boxes=50) == {"max_boxes": 50}
    assert resolve_options("uniter-imgdb", conf_th=0.3)["conf_th"] == 0.3
    for fmt, kwargs, message in [
            ("lxmert-tsv", {"conf_th": 0.5}, "lxmert-tsv does not take --conf-th"),
            ("butd-tsv", {"num_boxes": 10, "max_boxes": 20}, "not both"),
            ("mmf-npy", {"num_boxes": 0}, "positive integer"),
            ("uniter-imgdb", {"conf_th": 1.5}, r"\[0, 1\)"),
            ("uniter-imgdb", {"min_boxes": 50, "max_boxes": 20}, "larger than"),
            ("tfrecord", {}, "unknown export format")]:
        with pytest.raises(ExportError, match=message):
            resolve_options(fmt, **kwargs)


def test_butd_tsv_refuses_keep_ids(store, tmp_path):
    with pytest.raises(ExportError, match="integer image ids"):
        export(store, tmp_path / "b.tsv", "butd-tsv", id_format="keep", progress="off")
    assert list(tmp_path.iterdir()) == []


def test_id_maps():
    assert image_id_as("0042", "int") == 42
    assert image_id_as("val2014/COCO_val2014_000000000042.jpg", "trailing-int") == 42
    assert image_id_as("a/b", "keep") == "a/b"
    with pytest.raises(RecordIssue, match="not an integer"):
        image_id_as("12a", "int")
    with pytest.raises(RecordIssue, match="no digits"):
        image_id_as("abc", "trailing-int")
    ids = IdMap("trailing-int")
    assert ids("img_7") == 7
    with pytest.raises(RecordIssue, match="becomes 7, which record 'img_7' already has"):
        ids("other_007")


_IDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(_IDS, st.sampled_from(["keep", "int", "trailing-int"]))
def test_fuzz_any_image_id_maps_or_is_a_record_issue(image_id, id_format):
    try:
        value = image_id_as(image_id, id_format)
    except RecordIssue:
        return
    assert isinstance(value, str if id_format == "keep" else int)
    assert value >= 0 if isinstance(value, int) else value == image_id


@settings(max_examples=300, deadline=None)
@given(_IDS)
def test_fuzz_tsv_ids_read_back_unchanged_or_are_refused(image_id):
    """A TSV id either comes back from csv.DictReader exactly (the LXMERT/BUTD readers) or is refused."""
    try:
        cell = _check_text_id(image_id)
    except RecordIssue:
        return
    text = (cell + b"\t1\t2\n").decode("utf-8")
    with io.StringIO(text, newline=None) as handle:  # open(fname): universal newlines
        rows = list(csv.DictReader(handle, ["img_id", "a", "b"], delimiter="\t"))
    assert len(rows) == 1 and rows[0]["img_id"] == image_id and rows[0]["b"] == "2"


@settings(max_examples=300, deadline=None)
@given(_IDS)
def test_fuzz_mmf_file_names_stay_inside_the_output(image_id):
    try:
        rel = relative_file(image_id)
    except RecordIssue:
        return
    assert not rel.is_absolute() and ".." not in rel.parts and str(rel) == image_id


# -- CLI --------------------------------------------------------------------------------------

def _cli(args):
    from vlp.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_export_and_its_errors(store, tmp_path):
    out = tmp_path / "u"
    result = _cli(["export", store, "--to", "uniter-imgdb", "--out", out])
    assert result.exit_code == 0, result.output
    assert "exported 12 record(s)" in result.output
    assert (out / "nbb_th0.2_max100_min10.json").is_file()
    again = _cli(["export", store, "--to", "uniter-imgdb", "--out", out])
    assert again.exit_code == 1 and "Error: " in again.output and "already exists" in again.output
    assert "Traceback" not in again.output
    usage = _cli(["export", store, "--to", "lxmert-tsv", "--out", tmp_path / "x.tsv", "--conf-th", "0.3"])
    assert usage.exit_code == 2 and "does not take --conf-th" in usage.output
    missing = _cli(["export", tmp_path / "nope", "--to", "mmf-npy", "--out", tmp_path / "m"])
    assert missing.exit_code == 2
    not_a_store = _cli(["export", tmp_path, "--to", "mmf-npy", "--out", tmp_path / "m"])
    assert not_a_store.exit_code == 1 and "manifest.json" in not_a_store.output


def test_cli_export_ctrl_c_exits_130(store, tmp_path, monkeypatch):
    import vlp.exporters

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vlp.exporters, "export", interrupted)
    result = _cli(["export", store, "--to", "mmf-npy", "--out", tmp_path / "m"])
    assert result.exit_code == 130 and "nothing was written" in result.output


def test_sidecar_names_the_store_detector_and_settings(store, tmp_path):
    export(store, tmp_path / "b.tsv", "butd-tsv", max_boxes=12, progress="off")
    sidecar = json.loads((tmp_path / "b.tsv.vlp-export.json").read_text())
    assert sidecar["source"]["path"] == str(store.resolve())
    assert sidecar["source"]["num_records"] == 12 and sidecar["source"]["feature_dim"] == 8
    assert "detector_config_hash" in sidecar["source"]
    assert sidecar["settings"] == {"id_format": "int", "max_boxes": 12}
    assert sidecar["records"]["exported"] == 12 and sidecar["errors_file"] is None
    assert sidecar["conventions"]["width_before_height"] is True
    assert sidecar["created"].endswith("+00:00")


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(store, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(ExportError, match="holds no earlier vlp export"):
        export(store, precious, "mmf-npy", overwrite=True, progress="off")
    assert (precious / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(ExportError, match="is or holds it"):
        export(store, store.parent, "mmf-npy", overwrite=True, progress="off")
    with pytest.raises(ExportError, match="is or holds it"):
        export(store, store / "inside", "mmf-npy", progress="off")
    assert FeatureStore(store).keys()


def test_an_export_moved_aside_by_a_killed_overwrite_comes_back(store, tmp_path):
    out = tmp_path / "v"
    export(store, out, "volta-lmdb", progress="off")
    out.rename(tmp_path / "v.old")  # killed between the two renames of an overwrite
    with pytest.raises(ExportError, match="already exists"):
        export(store, out, "volta-lmdb", progress="off")
    assert (out / "vlp-export.json").is_file() and not (tmp_path / "v.old").exists()


def test_lmdb_writers_commit_by_size_so_memory_stays_flat():
    """LMDB keeps a write transaction's pages in memory until commit: 20 MB values must not
    wait for 1000 records (the old rule: 1000 x 400 kB records held 400 MB)."""
    from vlp.exporters.volta import add_committing

    class Txn:
        def __init__(self, log):
            self.log = log

        def put(self, key, value):
            self.log.append(("put", len(value)))

        def commit(self):
            self.log.append(("commit",))

    class Env:
        def __init__(self, log):
            self.log = log

        def begin(self, write=False):
            return Txn(self.log)

    class Writer:
        def __init__(self):
            self.log = []
            self.env = Env(self.log)
            self.txn = Txn(self.log)
            self._pending = 0

    writer = Writer()
    value = b"\0" * (20 << 20)
    for k in range(4):
        add_committing(writer, b"%d" % k, value)
    assert [entry[0] for entry in writer.log] == ["put", "put", "commit", "put", "put", "commit"]
    small = Writer()
    for k in range(1001):
        add_committing(small, b"%d" % k, b"x")
    assert small.log.count(("commit",)) == 1 and small.log[1000] == ("commit",)


# -- reading MMF folders back (vlp.pipeline.import_features.import_mmf_npy) -----------------

def _npy_bytes(value) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=True)
    return buffer.getvalue()


_VALUES = st.one_of(st.integers(-5, 5000), st.text(max_size=5), st.none(), st.booleans(),
                    st.lists(st.integers(0, 9), max_size=3),
                    st.builds(lambda r, c, k: np.ones((r, c), dtype=k), st.integers(0, 4), st.integers(0, 5),
                              st.sampled_from(["<f4", "<f2", "<i8", "|u1", "<c8", "U3"])))
_INFOS = st.one_of(
    st.binary(max_size=200),  # not a .npy at all
    st.builds(lambda d: _npy_bytes(d),  # a dict with any of the keys MMF uses, any values
              st.dictionaries(st.sampled_from(["bbox", "image_width", "image_height", "cls_prob", "num_boxes",
                                               "objects"]), _VALUES, max_size=6)),
    st.builds(lambda v: _npy_bytes(v), _VALUES),  # a plain value, not a dict
    st.builds(lambda b: _npy_bytes({"x": 1})[:60] + b, st.binary(max_size=80)),  # a torn pickle
)
_FEATURES = st.one_of(st.binary(max_size=100),
                      st.builds(lambda r, c, k: _npy_bytes(np.ones((r, c), dtype=k)), st.integers(0, 5),
                                st.integers(0, 6), st.sampled_from(["<f4", "<f2", "<i4", "U2"])),
                      st.builds(lambda: _npy_bytes(np.ones(3))))


@settings(max_examples=150, deadline=None)
@given(_INFOS, st.one_of(st.none(), _FEATURES))
def test_fuzz_mmf_import_gives_records_or_clean_errors(info, features):
    import tempfile

    from vlp.pipeline.import_features import import_mmf_npy
    from vlp.schemas import StoreError

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "mmf"
        source.mkdir()
        (source / "7_info.npy").write_bytes(info)
        if features is not None:
            (source / "7.npy").write_bytes(features)
        try:
            stats = import_mmf_npy(source, Path(tmp) / "out", trust_pickle=True, on_error="skip", progress=False)
        except StoreError as exc:
            assert "no record could be imported" in str(exc)
            errors = (Path(tmp) / "out" / "errors.jsonl").read_text().splitlines()
            assert len(errors) == 1 and "7_info.npy" in json.loads(errors[0])["where"]
        else:
            assert stats.records == 1
            back = FeatureStore(Path(tmp) / "out")
            assert back["7"].num_boxes >= 1
            back.close()


def test_mmf_import_refuses_untrusted_pickles_and_code(tmp_path):
    import pickle

    from vlp.pipeline.import_features import import_mmf_npy
    from vlp.schemas import StoreError

    source = tmp_path / "mmf"
    source.mkdir()
    np.save(source / "1.npy", np.ones((2, 4), dtype=np.float32))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    holder = np.empty((), dtype=object)
    holder[()] = {"bbox": Evil()}
    with open(source / "1_info.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(holder, handle, protocol=3)
    with pytest.raises(StoreError, match="trust_pickle"):
        import_mmf_npy(source, tmp_path / "out")
    stats_error = None
    try:
        import_mmf_npy(source, tmp_path / "out", trust_pickle=True, on_error="skip", progress=False)
    except StoreError as exc:
        stats_error = str(exc)
    assert stats_error and "no record could be imported" in stats_error
    assert "refusing to load" in (tmp_path / "out" / "errors.jsonl").read_text()
    assert not (tmp_path / "pwned").exists()
