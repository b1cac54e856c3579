"""Neighbourhood ablation (k, radius, no graph) -> table + plot. Same as ``gnnst ablate``."""
from gnnst.cli import ablate_main, run_and_exit  # noqa: E402
run_and_exit(ablate_main)
