"""Config -> cross-validated model, metrics and predictions. Same as ``gnnst train``."""
from gnnst.cli import train_main, run_and_exit  # noqa: E402
run_and_exit(train_main)
