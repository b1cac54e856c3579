"""Run a ``gnnst`` command in a child process and measure its wall time and peak resident memory."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ChildRun:
    seconds: float  # wall time of the whole process (imports, model load, work, writing)
    peak_rss_mb: float  # the child's own peak resident set size (os.wait4's ru_maxrss)
    stdout: str
    stderr: str


def run_gnnst(args: list[str], *, env: dict | None = None) -> ChildRun:
    """``python -m gnnst <args>`` in a fresh interpreter; raises with its stderr when it fails."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "gnnst", *map(str, args)], cwd=REPO, stdout=fo, stderr=fe,
                             text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (Popen.wait would discard it)
        seconds = time.perf_counter() - t0
        p.returncode = code = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if code != 0:
        raise RuntimeError(f"gnnst {' '.join(map(str, args))} exited {code}:\n{err[-3000:]}")
    return ChildRun(seconds=seconds, peak_rss_mb=usage.ru_maxrss / 1024, stdout=out, stderr=err)
