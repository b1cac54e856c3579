"""What every patch encoder is (:class:`PatchEncoder`), the registry of named builders, and where and
how an encoder runs: device, batch size, precision, CPU threads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch

_REGISTRY: dict[str, Callable[..., "PatchEncoder"]] = {}

# Patches per forward pass on a CPU (the default of encoder.batch_size, `gnnst predict --batch-size` and
# the embedding functions): on the 2-core CPU, with gnnst.runtime's malloc settings, 4 to 16 all ran at
# ~240 patches/s and 32 at 159 (without them 6 was best, 8: 207, 16: 162). On a GPU use 64 or more.
CPU_BATCH_SIZE = 6
# Patches per forward pass on a CUDA device: the default encoder ran 15,150 patches/s in float32 at 128
# and 21,700 in bfloat16 at 512 on an H200; 256 keeps a ViT-g (H-optimus, Prov-GigaPath) in a few GB.
CUDA_BATCH_SIZE = 256

PRECISIONS = ("auto", "float32", "bfloat16", "float16")  # values of encoder.precision
DEFAULT_PATCH_UM = 150.0  # patch side (µm) of encoders whose training resolution is not known


def register_encoder(name: str) -> Callable:
    """Decorator registering a builder ``fn(checkpoint: str | None) -> PatchEncoder`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = fn
        return fn

    return deco


def registered(name: str) -> Callable[..., "PatchEncoder"] | None:
    """The builder registered under ``name``, or ``None``."""
    return _REGISTRY.get(name)


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


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
        interpolation: how a patch is resampled to ``S`` x ``S``: ``"bilinear"`` or ``"bicubic"``
            (antialiased when shrinking).
        patch_um: default patch side in µm (``patch.size_um: null``): the encoder's input size times
            the µm per pixel it was trained at, where known.
        source: how to build it again: ``{"checkpoint": path or None, "timm_kwargs": {...} or None}``.
        precision: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (set by :meth:`to`); forward passes
            run under autocast in the lower precisions and return float32.
    """

    name: str
    model: "torch.nn.Module"
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    identity: str
    classifier: "torch.nn.Module | None" = None
    interpolation: str = "bilinear"
    patch_um: float = DEFAULT_PATCH_UM
    source: dict = field(default_factory=dict)
    precision: str = "float32"
    _norm: tuple = field(default=(), repr=False)  # (mean, std) as [1, 3, 1, 1] tensors on the device

    @property
    def key(self) -> str:
        """Short name usable in file names and AnnData keys."""
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in self.name)

    @property
    def cache_identity(self) -> str:
        """:attr:`identity` plus the precision when it is not float32 (lower precisions move the
        embeddings, so their cache entries are kept apart; float32 keys are those of earlier versions)."""
        return self.identity if self.precision == "float32" else f"{self.identity}:{self.precision}"

    def record(self) -> dict:
        """What a run records about its encoder (``dataset.json``, trained models): enough to build it again."""
        return {"name": self.name, "identity": self.identity, "input_size": self.input_size, "dim": self.dim,
                "precision": self.precision, "patch_um": self.patch_um, **self.source}

    def to(self, device: "torch.device", precision: str = "float32") -> "PatchEncoder":
        """Move to ``device`` and run in ``precision`` (one of :data:`PRECISIONS`; ``auto`` resolved with
        :func:`resolve_precision`)."""
        import torch

        self.precision = resolve_precision(precision, device)
        # channels-last matches the patches' layout: ~3x faster convolutions on CPU than NCHW here
        self.model.to(device=device, memory_format=torch.channels_last)
        # made once: a tensor built from Python numbers per batch would be a blocking copy on CUDA
        self._norm = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.mean, self.std))
        if self.classifier is not None:
            self.classifier.to(device)
        return self

    def embed(self, images: "torch.Tensor") -> "torch.Tensor":
        """``[B, 3, S, S]`` float in [0, 1] -> ``[B, dim]`` float32, without autograd."""
        import torch

        with torch.inference_mode():
            if self._norm and self._norm[0].device == images.device:
                mean, std = self._norm
            else:
                mean, std = (images.new_tensor(v).view(1, 3, 1, 1) for v in (self.mean, self.std))
            x = (images - mean) / std
            if self.precision == "float32":
                return self.model(x).float()
            with torch.autocast(images.device.type, dtype=getattr(torch, self.precision)):
                return self.model(x).float()


def resolve_device(spec: str) -> "torch.device":
    """``"auto"`` -> CUDA when present (this process's ``LOCAL_RANK`` GPU under torchrun), else CPU;
    otherwise ``torch.device(spec)``."""
    import torch

    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise GnnstError(f"config key 'device': unknown device '{spec}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GnnstError(f"config key 'device': '{spec}' asked for but CUDA is not available")
    return dev


def resolve_precision(spec: str, device: "torch.device") -> str:
    """``encoder.precision`` on ``device``: ``auto`` = bfloat16 on a CUDA device that supports it
    (float16 on older ones), float32 on CPU; an explicit value is checked and kept."""
    import torch

    if spec not in PRECISIONS:
        raise GnnstError(f"config key 'encoder.precision': expected one of {', '.join(map(repr, PRECISIONS))}, "
                         f"got {spec!r}")
    if spec != "auto":
        return spec
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def default_batch_size(device: "torch.device") -> int:
    """Patches per forward pass when ``encoder.batch_size`` is ``null``: :data:`CUDA_BATCH_SIZE` on a
    CUDA device, :data:`CPU_BATCH_SIZE` otherwise."""
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def default_num_workers(device: "torch.device") -> int:
    """Patch-reading worker processes when ``encoder.num_workers`` is ``null``: on CUDA one per core
    this process may use, less one for the main process, at most 8; on CPU none (the encoder's threads
    already use every core; the next image is still decoded in a background thread)."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(min(cores - 1, 8), 1)


def set_cpu_threads(num_threads: int | None) -> None:
    """Use ``num_threads`` torch threads (default: every core this process may run on)."""
    import torch

    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(int(num_threads or 1), 1))
