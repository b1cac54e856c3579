"""Trained checkpoint + unseen slide (image and spot table, or --grid-um over its tissue) -> .h5ad. Same as ``gnnst predict``."""
import sys; from gnnst.cli import predict_main  # noqa: E702
sys.exit(predict_main(sys.argv[1:]))
