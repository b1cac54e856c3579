"""Trained checkpoint + unseen slide (image, spot coordinates) -> .h5ad of predictions. Same as ``gnnst predict``."""
import sys; from gnnst.cli import predict_main  # noqa: E702
sys.exit(predict_main(sys.argv[1:]))
