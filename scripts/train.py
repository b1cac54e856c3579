"""Config -> cross-validated model, metrics and predictions. Same as ``gnnst train``."""
import sys; from gnnst.cli import train_main  # noqa: E702
sys.exit(train_main(sys.argv[1:]))
