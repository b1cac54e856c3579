"""gnnst: spatial gene expression from H&E histology with graph neural networks.

``import gnnst`` stays light: torch, timm, openslide, scanpy and squidpy are imported
inside the functions that need them, and the scanpy-style ``gnnst.tl`` (tools) and ``gnnst.pl``
(plots) are imported on first use.
"""

__version__ = "0.1.0"

from gnnst.errors import GnnstError  # noqa: E402

__all__ = ["GnnstError", "__version__", "pl", "tl"]
_LAZY = ("tl", "pl")  # submodules imported on first attribute access (PEP 562)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"gnnst.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'gnnst' has no attribute '{name}'")
