"""gnnst: spatial gene expression from H&E histology with graph neural networks.

``import gnnst`` stays light: torch, timm, openslide, scanpy and squidpy are imported
inside the functions that need them.
"""

__version__ = "0.1.0"

from gnnst.errors import GnnstError  # noqa: E402

__all__ = ["GnnstError", "__version__"]
