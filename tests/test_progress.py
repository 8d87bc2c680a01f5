"""The progress display shared by extraction, building and training."""

from __future__ import annotations

import io

from vlp.core.progress import Progress


def test_lines_mode_prints_one_final_line_however_often_closed():
    stream = io.StringIO()
    progress = Progress(10, "stage a", unit="step", mode="lines", initial=4, stream=stream)
    progress.update(3, loss="0.5")
    progress.close()
    progress.close()  # e.g. a watcher closing every bar it made at the end
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage a: 7/10 step (70%)") and "loss 0.5" in lines[0]


def test_off_mode_prints_nothing():
    stream = io.StringIO()
    progress = Progress(5, "x", mode="off", stream=stream)
    progress.update(5)
    progress.close("done")
    assert stream.getvalue() == ""
