"""Readers: one function per source, each returning the canonical AnnData of
:mod:`gnnst.data.validate`. The manifest's ``reader`` field names one of :data:`READERS`; its
``files`` roles are the reader's positional (path) arguments, its ``reader_options`` the reader's
keyword-only arguments other than ``slide_id``, ``mpp`` and ``pitch_um`` (which come from the
manifest's ``slide_id`` and ``scale``). A reader whose role may be a folder lists the files it uses
from it with a module-level ``folder_files(path)`` (the folder's checksum covers those).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Callable

from gnnst.errors import GnnstError

# reader name -> "module:function"; imported lazily so `import gnnst` stays light
READERS: dict[str, str] = {
    "legacy_st": "gnnst.data.readers.legacy_st:read_legacy_st",
    "spaceranger": "gnnst.data.readers.spaceranger:read_spaceranger",
    "hest": "gnnst.data.readers.hest:read_hest",
    "h5ad": "gnnst.data.readers.h5ad:read_h5ad",
    "spatialdata": "gnnst.data.readers.spatialdata:read_spatialdata",
}


# keyword arguments filled from the manifest itself, never given as reader_options
FROM_MANIFEST = ("slide_id", "mpp", "pitch_um")
# options whose value is one of a fixed set, whichever reader has them
OPTION_CHOICES: dict[str, tuple[str, ...]] = {"unmatched": ("error", "drop")}
MIN_PATCH_PX = 32  # below this patch side (pixels of the image read) predictions are unreliable

log = logging.getLogger("gnnst")


def get_reader(name: str) -> Callable:
    """The reader function registered under ``name``."""
    if name not in READERS:
        raise GnnstError(f"unknown reader '{name}' (known: {', '.join(sorted(READERS))})")
    mod, fn = READERS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def reader_signature(name: str) -> tuple[dict[str, bool], dict[str, object]]:
    """``({role: required}, {option: default})`` of reader ``name`` (see the module docstring)."""
    roles, options = {}, {}
    for p in inspect.signature(get_reader(name)).parameters.values():
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            roles[p.name] = p.default is p.empty
        elif p.kind is p.KEYWORD_ONLY and p.name not in FROM_MANIFEST:
            options[p.name] = p.default
    return roles, options


def check_roles(name: str, roles: list[str], *, where: str) -> None:
    """Raise naming ``where`` if ``roles`` has one reader ``name`` does not read, or lacks a required one."""
    known, _ = reader_signature(name)
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise GnnstError(f"{where}: reader '{name}' has no file role '{unknown[0]}' (roles: {', '.join(known)})")
    missing = [r for r, required in known.items() if required and r not in roles]
    if missing:
        raise GnnstError(f"{where}: reader '{name}' needs file role '{missing[0]}'")


def check_reader_options(name: str, options: dict, *, where: str) -> None:
    """Raise naming ``where`` and the option if ``options`` do not fit reader ``name``.

    An option's value must have the type of the reader's default (a bool for a bool, a number for a
    number, a string for a string or ``None``) and, for the options of :data:`OPTION_CHOICES`, be one
    of the allowed values.
    """
    _, known = reader_signature(name)
    for key, value in options.items():
        if key not in known:
            hint = f" (set it under 'scale' or 'slide_id')" if key in FROM_MANIFEST else ""
            raise GnnstError(f"{where}: reader '{name}' has no option '{key}'{hint} "
                             f"(options: {', '.join(known) or 'none'})")
        default = known[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        else:
            ok = isinstance(value, str)
        choices = OPTION_CHOICES.get(key)
        if ok and choices is not None:
            ok = value in choices
        if not ok:
            want = (" or ".join(repr(c) for c in choices) if choices else
                    "true or false" if isinstance(default, bool) else
                    "a positive number" if isinstance(default, (int, float)) else "a string")
            raise GnnstError(f"{where}: option '{key}' must be {want}, got {value!r}")


def check_choice(option: str, value) -> None:
    """Raise if ``value`` is not one of :data:`OPTION_CHOICES` ``[option]`` (for readers called from Python)."""
    if value not in OPTION_CHOICES[option]:
        raise GnnstError(f"reader option '{option}' must be {' or '.join(map(repr, OPTION_CHOICES[option]))}, "
                         f"got {value!r}")


def folder_files(name: str, folder: Path) -> list[Path]:
    """The files reader ``name`` uses from ``folder`` (a folder role), for the folder's checksum."""
    mod = importlib.import_module(READERS[name].split(":")[0])
    lister = getattr(mod, "folder_files", None)
    if lister is None:
        raise GnnstError(f"{folder} is a folder, but reader '{name}' reads files; name the file instead")
    return lister(Path(folder))


def log_patch_size(adata, patch_size_um: float, *, manifest_path, size: tuple[int, int] | None = None) -> None:
    """Log the image a slide's patches are cut from and the patch side in its pixels; warn loudly when
    that side is under :data:`MIN_PATCH_PX` (e.g. Space Ranger's lowres PNG). ``size``: the image's
    (width, height), read from its header when not given."""
    from gnnst import keys
    from gnnst.data.validate import image_coordinates

    meta = adata.uns[keys.UNS_GNNST]
    _, image_mpp = image_coordinates(adata)
    if image_mpp is None or not meta.get(keys.IMAGE_PATH):
        return
    w, h = size or image_size(meta[keys.IMAGE_PATH])
    slide_id = str(adata.obs[keys.SLIDE_ID].iloc[0])
    side = patch_size_um / image_mpp
    scalef = float(meta.get(keys.IMAGE_SCALEF, 1.0))
    log.info("slide %s: image %s (%d x %d px%s, %.4g µm/px): %g µm patches are %.0f px", slide_id,
             meta[keys.IMAGE_PATH], w, h, "" if scalef == 1.0 else f", {scalef:.6g} px per full-resolution px",
             image_mpp, patch_size_um, side)
    if side < MIN_PATCH_PX:
        log.warning("slide %s: UNRELIABLE: %g µm patches are only %.0f px wide in %s (%.4g µm/px, under "
                    "%d px); predictions from this image are unreliable: give the full-resolution H&E as "
                    "'files.image' in %s", slide_id, patch_size_um, side, meta[keys.IMAGE_PATH],
                    image_mpp, MIN_PATCH_PX, manifest_path)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding it (an OME-Zarr image folder:
    from its metadata)."""
    from pathlib import Path

    from gnnst.data.images import PIL_SUFFIXES

    p = Path(path)
    if p.is_dir():
        from gnnst.data.zarr_image import ZarrPyramid

        return ZarrPyramid(p).dimensions
    if not p.is_file():
        raise GnnstError(f"image file not found: {p}")
    try:
        if p.suffix.lower() in PIL_SUFFIXES:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None
            with Image.open(p) as im:
                return im.size
        import openslide

        with openslide.OpenSlide(str(p)) as s:
            return s.dimensions
    except GnnstError:
        raise
    except Exception as e:
        raise GnnstError(f"{p}: cannot read the image ({type(e).__name__}: {e})") from None
