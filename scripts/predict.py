"""Trained checkpoint + unseen slide (image and spot table, or --grid-um over its tissue) -> .h5ad. Same as ``gnnst predict``."""
from gnnst.cli import predict_main, run_and_exit  # noqa: E402
run_and_exit(predict_main)
