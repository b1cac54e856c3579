"""Models: registry, layers, neighbour branch, the gnnst model, losses.

``create_model(name, in_dim=..., num_genes=..., cfg=...)`` builds a registered model.
The names below are imported lazily (PEP 562), so ``gnnst.config`` can import
``gnnst.models.config`` without pulling in torch and PyG; ``import gnnst`` does not import
this package at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ModelConfig": "gnnst.models.config",
    "GNNST": "gnnst.models.gnnst",
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
    from gnnst.models.config import ModelConfig
    from gnnst.models.gnnst import GNNST
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
