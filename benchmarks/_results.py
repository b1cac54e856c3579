"""Shared by the benchmark scripts: the machine description and section-wise updates of RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_info() -> str:
    """One line: CPU model, cores, RAM, Python, torch, date, git commit."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores, {mem}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}, commit {commit}")


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section ``key`` of RESULTS.md, stamped with the machine line."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is written by the script it names; rerun the script to refresh it.\n"
    block = f"<!-- {key}:start -->\n## {title}\n\nMachine: {machine_info()}\n\n{body}\n<!-- {key}:end -->"
    pat = re.compile(rf"<!-- {re.escape(key)}:start -->.*?<!-- {re.escape(key)}:end -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def publish(key: str, title: str, text: str, data: dict, *, write: bool = True) -> None:
    """Print the machine line and ``text``; with ``write``, make ``text`` the section ``key`` of
    RESULTS.md and save ``data`` as ``results/<key>.json``."""
    import json

    print(machine_info())
    print(text)
    if write:
        write_section(key, title, text)
        (RESULTS.parent / "results").mkdir(exist_ok=True)
        (RESULTS.parent / "results" / f"{key}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
