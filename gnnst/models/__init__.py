"""Models: the interface (base), registry, layers, neighbour branch, retrieval, losses, the gnnst model
and the BLEEP-style and mclSTExp-style comparison models.

``create_model(name, in_dim=..., num_genes=..., cfg=...)`` builds a registered model; every one
implements :class:`~gnnst.models.base.ExpressionModel`. The names below are imported lazily
(PEP 562); ``import gnnst`` does not import this package at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ModelConfig": "gnnst.config",
    "GNNST": "gnnst.models.gnnst",
    "BLEEP": "gnnst.models.bleep",
    "MclSTExp": "gnnst.models.mclstexp",
    "ExpressionModel": "gnnst.models.base",
    "blend": "gnnst.models.base",
    "retrieve_topk": "gnnst.models.retrieval",
    "NeighborBranch": "gnnst.models.neighbour",
    "clip_loss": "gnnst.models.losses",
    "compute_losses": "gnnst.models.losses",
    "masked_recon_loss": "gnnst.models.losses",
    "create_model": "gnnst.models.registry",
    "list_models": "gnnst.models.registry",
    "register_model": "gnnst.models.registry",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from gnnst.config import ModelConfig
    from gnnst.models.base import ExpressionModel, blend
    from gnnst.models.bleep import BLEEP
    from gnnst.models.gnnst import GNNST
    from gnnst.models.mclstexp import MclSTExp
    from gnnst.models.retrieval import retrieve_topk
    from gnnst.models.losses import clip_loss, compute_losses, masked_recon_loss
    from gnnst.models.neighbour import NeighborBranch
    from gnnst.models.registry import create_model, list_models, register_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gnnst.models' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
