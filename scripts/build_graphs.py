"""Manifest -> cached spot graphs. Same as ``gnnst build-graphs``."""
import sys; from gnnst.cli import build_graphs_main  # noqa: E702
sys.exit(build_graphs_main(sys.argv[1:]))
