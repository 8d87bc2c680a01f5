"""vlp.core.durable: atomic replacement and append-only JSON lines that survive a kill."""

import json
import os
import subprocess
import sys

import pytest

from vlp.core.durable import (JsonLines, atomic_path, atomic_write, atomic_write_json, cut_torn_tail, publish,
                              read_json_lines)


def test_atomic_write_replaces_whole_and_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(path, b"old")
    atomic_write(path, lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new"

    def fails(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fails)
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temporary file left


def test_atomic_path_for_writers_that_want_a_name(tmp_path):
    path = tmp_path / "plot.txt"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_text("drawn")
        assert not path.exists()
    assert path.read_text() == "drawn"
    with pytest.raises(KeyError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyError("x")
    assert path.read_text() == "drawn" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.txt"]


def test_publish_renames_a_finished_file(tmp_path):
    (tmp_path / "s.partial").write_bytes(b"shard")
    publish(tmp_path / "s.partial", tmp_path / "s.arrow")
    assert (tmp_path / "s.arrow").read_bytes() == b"shard" and not (tmp_path / "s.partial").exists()


def test_json_with_a_name_that_was_not_utf8_round_trips(tmp_path):
    name = os.fsdecode(b"bad\xff.jpg")  # a lone surrogate, as os.listdir gives it
    atomic_write_json(tmp_path / "m.json", {"name": name})
    assert json.loads((tmp_path / "m.json").read_bytes()) == {"name": name}
    with JsonLines(tmp_path / "e.jsonl") as log:
        log.append({"path": name})
    assert list(read_json_lines(tmp_path / "e.jsonl")) == [{"path": name}]


def test_a_torn_last_line_is_skipped_when_read_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3')  # killed mid-line
    assert list(read_json_lines(path)) == [{"a": 1}, {"a": 2}]
    log = JsonLines(path)
    log.append({"a": 4})
    log.close()
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n{"a": 4}\n'
    assert log.count == 1


def test_cut_torn_tail_on_a_long_line_without_any_newline(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b"x" * 200_000)
    cut_torn_tail(path)
    assert path.read_bytes() == b'{"a": 1}\n'
    path.write_bytes(b"y" * 70_000)
    cut_torn_tail(path)
    assert path.read_bytes() == b""


def test_a_writer_killed_between_appends_leaves_only_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    script = ("import sys, os\nfrom vlp.core.durable import JsonLines\nlog = JsonLines(sys.argv[1])\n"
              "for i in range(3):\n    log.append({'i': i})\n"
              "log._handle.write('{\"i\": 3, \"torn')\nlog._handle.flush()\nos._exit(9)\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)])
    assert result.returncode == 9
    assert [row["i"] for row in read_json_lines(path)] == [0, 1, 2]
    with JsonLines(path) as log:
        log.append({"i": 3})
    assert [row["i"] for row in read_json_lines(path)] == [0, 1, 2, 3]
