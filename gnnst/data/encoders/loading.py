"""Weights files read and checked tensor by tensor: nothing is dropped, nothing is left at its
random initialisation.

A file is compared with the layout the model expects (names and shapes) before anything is loaded;
the first missing tensor, unexpected tensor or shape mismatch is a one-line :class:`GnnstError`
naming the tensor, the encoder and the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch

# Wrappers and prefixes a generic ``timm:<arch>`` checkpoint may carry (training scripts save
# ``{"state_dict": ...}`` or ``{"model": ...}``; DDP adds ``module.``). Removed only when the whole
# file has them; named recipes declare their own layout instead (see recipes.py).
GENERIC_WRAPPERS = ("state_dict", "model")
GENERIC_PREFIXES = ("module.", "model.", "backbone.")


def file_digest(path: Path) -> str:
    """Identity of a weights file for cache keys: path, size and modification time (hashing a
    several-GB file on every run would cost more than encoding a slide)."""
    from gnnst.io import file_identity

    return hashlib.sha256(file_identity(path).encode()).hexdigest()[:16]


def read_state_dict(path: str | Path, *, label: str) -> dict:
    """The tensors of a weights file: ``.safetensors`` (safetensors) or a torch pickle (``.bin``,
    ``.pth``, ``.pt``; loaded with ``weights_only=True``, memory-mapped when the format allows).

    ``label`` names the encoder in errors.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise GnnstError(f"encoder '{label}': checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) torch files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except GnnstError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise GnnstError(f"encoder '{label}': {path} is not a weights file ({type(e).__name__}: {msg})") from None
    if not isinstance(state, Mapping) or not state:
        raise GnnstError(f"encoder '{label}': {path} holds no state dict (got {type(state).__name__})")
    return dict(state)


def unwrap_generic(state: dict) -> tuple[dict, str]:
    """``state`` without a :data:`GENERIC_WRAPPERS` wrapper or a :data:`GENERIC_PREFIXES` prefix shared by
    every key, and a note of what was removed (``""`` when nothing was)."""
    notes = []
    if len(state) == 1 and next(iter(state)) in GENERIC_WRAPPERS and isinstance(next(iter(state.values())), Mapping):
        key = next(iter(state))
        state, notes = dict(state[key]), [f"wrapper '{key}'"]
    for prefix in GENERIC_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            notes.append(f"prefix '{prefix}'")
            break
    return state, ", ".join(notes)


def check_layout(state: Mapping, expected: Mapping[str, tuple], *, label: str, path: str | Path) -> None:
    """Raise unless ``state`` has exactly the tensors of ``expected`` (name -> shape).

    The message names the first missing tensor (in ``expected``'s order), else the first unexpected
    one (in the file's order), else the first of another shape, with the counts of each kind.
    """
    import torch

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_type = [k for k in state if k in expected and not isinstance(state[k], torch.Tensor)]
    shape = [k for k in expected if k in state and k not in bad_type and tuple(state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or bad_type or shape):
        return
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} of another shape"
    if missing:
        what = f"lacks tensor '{missing[0]}' {tuple(expected[missing[0]])}"
    elif unexpected:
        what = f"has unexpected tensor '{unexpected[0]}'"
    elif bad_type:
        what = f"entry '{bad_type[0]}' is a {type(state[bad_type[0]]).__name__}, not a tensor"
    else:
        k = shape[0]
        what = f"tensor '{k}' has shape {tuple(state[k].shape)}, the model needs {tuple(expected[k])}"
    raise GnnstError(f"encoder '{label}': {path} {what} ({counts}); not the weights this encoder is built for")


def model_layout(module: "torch.nn.Module") -> dict[str, tuple]:
    """Name -> shape of every tensor in ``module``'s state dict (works on the ``meta`` device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_exact(module: "torch.nn.Module", state: Mapping, *, label: str, path: str | Path) -> None:
    """Load ``state`` (already in ``module``'s names and shapes) into ``module``, strictly, as float32.

    ``module`` may live on the ``meta`` device: its tensors are then replaced by the file's
    (``assign=True``), so a billion-parameter model is never initialised only to be overwritten.
    """
    import torch

    check_layout(state, model_layout(module), label=label, path=path)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    module.load_state_dict(state, strict=True, assign=on_meta)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer the file cannot hold: such an architecture needs a real init
        raise GnnstError(f"encoder '{label}': tensor '{left[0]}' is not in the weights file and was never "
                         "initialised; build this architecture on the CPU")
    module.requires_grad_(False)
