"""One benchmark configuration per fresh Python process, so that allocator state, thread
pools and peak-memory counters of one run never colour the next: the script calls itself
with ``--_worker SPEC_JSON``, and the worker prints its result as the last line of JSON."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, spec: dict, label: str) -> dict:
    """Run ``script --_worker SPEC`` and return the worker's result; exit naming ``label``
    with the end of the worker's stderr if it failed."""
    proc = subprocess.run([sys.executable, script, "--_worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {label}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
