"""Neighbourhood ablation (k, radius, no graph) -> table + plot. Same as ``gnnst ablate``."""
import sys; from gnnst.cli import ablate_main  # noqa: E702
sys.exit(ablate_main(sys.argv[1:]))
