"""Models registered by name and built with :func:`create_model` (as in timm's ``_registry``).

A registered entry point is a function ``fn(*, in_dim, num_genes, cfg) -> ExpressionModel``
(:mod:`gnnst.models.base`); the model files register their variants at import time (listed in
``_BUILTIN``): ``gnnst`` and its ablations ``gnnst_mlp``, ``gnnst_no_contrastive``,
``gnnst_no_nbhd_scale``, ``gnnst_masked_recon``; the comparison models ``bleep`` and ``mclstexp``.
A new model: a module under ``gnnst/models/`` with a class implementing the interface, a
``@register_model("name")`` entry point, and its module added to ``_BUILTIN``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from gnnst.errors import GnnstError
from gnnst.config import ModelConfig

EntryPoint = Callable[..., nn.Module]

_MODELS: dict[str, EntryPoint] = {}
_BUILTIN = ("gnnst.models.gnnst", "gnnst.models.bleep", "gnnst.models.mclstexp")  # modules whose import registers the built-in models


def _load_builtin() -> None:
    import importlib

    for module in _BUILTIN:
        importlib.import_module(module)


def register_model(fn_or_name: EntryPoint | str) -> EntryPoint | Callable[[EntryPoint], EntryPoint]:
    """Register a model entry point under its function name, or under an explicit name.

    Use as ``@register_model`` or ``@register_model("name")``.
    """

    def deco(fn: EntryPoint, name: str) -> EntryPoint:
        if name in _MODELS and _MODELS[name] is not fn:
            raise GnnstError(f"model name '{name}' is already registered")
        _MODELS[name] = fn
        return fn

    if isinstance(fn_or_name, str):
        return lambda fn: deco(fn, fn_or_name)
    return deco(fn_or_name, fn_or_name.__name__)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_builtin()
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    in_dim: int,
    num_genes: int,
    cfg: ModelConfig | None = None,
    **overrides,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: A name from :func:`list_models` (``cfg.name`` is set to it).
        in_dim: Width ``D`` of the patch embeddings ``x``, read from the data.
        num_genes: Number of genes ``G`` in the panel, read from the data.
        cfg: Model hyper-parameters; ``ModelConfig()`` defaults when ``None``.
        **overrides: :class:`ModelConfig` fields replacing those of ``cfg``
            (``create_model("gnnst", in_dim=16, num_genes=8, use_graph=False)``).

    Raises:
        GnnstError: on an unknown model name, an unknown override key or a bad size.
    """
    _load_builtin()
    if name not in _MODELS:
        raise GnnstError(f"unknown model name '{name}' (model.name); known: {', '.join(list_models())}")
    for key, value in (("in_dim", in_dim), ("num_genes", num_genes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GnnstError(f"create_model: {key} must be a positive integer, got {value!r}")
    cfg = ModelConfig() if cfg is None else cfg
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise GnnstError(
            f"unknown model config key 'model.{unknown[0]}' (known: {', '.join(sorted(fields))})"
        )
    cfg = dataclasses.replace(cfg, **overrides, name=name)
    return _MODELS[name](in_dim=in_dim, num_genes=num_genes, cfg=cfg)
