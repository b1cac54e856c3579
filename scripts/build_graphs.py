"""Manifest -> cached spot graphs. Same as ``gnnst build-graphs``."""
from gnnst.cli import build_graphs_main, run_and_exit  # noqa: E402
run_and_exit(build_graphs_main)
