"""The executables (`python -m gnnst`, `scripts/*.py`) exit through `run_and_exit`: status codes and
output must survive the fast exit."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_module_entry_status_and_output(tmp_path):
    r = _run("-m", "gnnst", "--version")
    assert r.returncode == 0 and r.stdout.startswith("gnnst ")
    r = _run("-m", "gnnst", "nope")
    assert r.returncode == 2 and "unknown command 'nope'" in r.stderr
    r = _run("-m", "gnnst", "predict", "--help")
    assert r.returncode == 0 and "--batch-size" in r.stdout
    r = _run("-m", "gnnst", "predict", "--checkpoint", "x.pt")  # argparse usage error
    assert r.returncode == 2 and "required" in r.stderr
    r = _run("-m", "gnnst", "predict", "--checkpoint", str(tmp_path / "missing.pt"), "--image", "a.jpg",
             "--spots", "s.tsv", "--out", str(tmp_path / "o.h5ad"))
    assert r.returncode == 2 and "gnnst: error:" in r.stderr and "Traceback" not in r.stderr


def test_script_shims_exit_the_same_way(tmp_path):
    r = _run("scripts/build_graphs.py", "--out", str(tmp_path / "g"), "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    assert not (tmp_path / "g").exists()


def test_tune_malloc_once_and_respects_the_user(monkeypatch):
    import gnnst.runtime as rt

    monkeypatch.setattr(rt, "_applied", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert rt.tune_malloc() is False  # the user's own setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert rt.tune_malloc() is False  # decided once per process
    monkeypatch.setattr(rt, "_applied", None)
    applied = rt.tune_malloc()
    assert applied is (sys.platform.startswith("linux"))  # glibc here; other C libraries are left alone


def test_pyg_jit_notice_is_silenced_and_other_warnings_are_not():
    # the notice torch prints when PyG is imported (PyG's use of torch.jit.script), raised as torch raises it
    code = ("import warnings\nfrom gnnst.cli import run_and_exit\n"
            "def command(argv):\n"
            "    warnings.warn('`torch.jit.script` is deprecated. Please switch to `torch.compile`', FutureWarning)\n"
            "    warnings.warn('a notice that still shows', FutureWarning)\n"
            "    return 0\n"
            "run_and_exit(command)\n")
    r = _run("-c", code)
    assert r.returncode == 0
    assert "torch.jit.script" not in r.stderr and "a notice that still shows" in r.stderr
