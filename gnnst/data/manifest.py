"""Data manifests: what a dataset is made of (files, checksums, sources), never the data itself.

Format (YAML)::

    name: her2st                   # dataset name
    description: ...               # free text
    citation: ...                  # free text
    reader: legacy_st              # default reader (gnnst.data.readers.READERS) for every slide
    reader_options: {unmatched: drop}  # default options of that reader (slides of another reader ignore them)
    scale: {pitch_um: 200}         # default scale: {mpp: 0.5} or {pitch_um: 200} (derived by legacy_st, spatialdata)
    source: {base_url: https://...}  # files' public source; a file's url is joined to it
    search_roots: [../../shared/data/her2st]  # extra data roots, relative to this manifest file
    slides:
      - slide_id: B4               # unique within the manifest
        patient_id: B              # folds are by patient where patients are known
        reader: legacy_st          # optional, overrides the default
        reader_options: {}         # optional, merged over the default reader_options
        scale: {mpp: 0.69}         # optional, overrides the default
        files:                     # role -> file or folder; roles are the reader's path arguments
          counts: {path: B4.tsv.gz, sha256: e382..., url: data/ST-cnts/B4.tsv.gz}

Roles and reader options are checked against the reader's signature when the manifest is loaded: a
role the reader has no path argument for, a missing required role, or an unknown option (or one of
the wrong type or value) is an error naming the slide, the role or option, and the manifest.

Folders: a role may name a folder when its reader reads one (``spaceranger``'s ``outs``,
``spatialdata``'s ``zarr``: a SpatialData ``.zarr`` store). A folder's
``sha256`` is the sha256 of its *listing*: one line ``<sha256 of the file>  <path relative to the
folder>`` per file the reader uses from it (for ``spaceranger``: the count matrix, the positions
table, ``scalefactors_json.json`` and the hires/lowres PNGs present; for ``spatialdata``: every file
of the store), sorted by path, each line ending in a newline; i.e.
``(cd outs && sha256sum FILES | LC_ALL=C sort -k2) | sha256sum``.
:func:`folder_sha256` computes it. ``sha256: skip`` (for a file or a folder) skips the check and
logs a warning; a role without ``sha256`` is not checked.

Data root: ``--data-root`` > ``$GNNST_DATA_ROOT`` > the manifest's ``search_roots`` > the download cache
(``$GNNST_CACHE`` or ``~/.cache/gnnst``)/data/<name>. A file missing from all of them is downloaded
from its public source into the cache and checked against its sha256; without network the error names
the file and every place looked. A folder role cannot be downloaded (give it no ``url``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gnnst.errors import GnnstError

log = logging.getLogger("gnnst")

DATA_ROOT_ENV = "GNNST_DATA_ROOT"
CACHE_ENV = "GNNST_CACHE"

SKIP = "skip"  # a file's sha256 that turns its check off (with a warning)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_TOP_KEYS = {"name", "description", "citation", "reader", "reader_options", "scale", "source", "search_roots",
             "slides"}
_SLIDE_KEYS = {"slide_id", "patient_id", "reader", "reader_options", "scale", "files"}
_FILE_KEYS = {"path", "sha256", "url"}
_SCALE_KEYS = {"mpp", "pitch_um"}
_SOURCE_KEYS = {"base_url"}


@dataclass
class FileEntry:
    role: str  # the reader argument this file is passed as
    path: str  # relative to the data root
    sha256: str | None = None  # expected checksum (hex; of the listing for a folder); None = not checked
    skip_check: bool = False  # the manifest says ``sha256: skip`` (not checked, with a warning)
    url: str | None = None  # public source (absolute, or relative to source.base_url)


@dataclass
class SlideEntry:
    slide_id: str
    patient_id: str | None
    reader: str
    files: dict[str, FileEntry]
    mpp: float | None = None  # fixed µm per pixel; None = derived by the reader
    pitch_um: float | None = None  # spot pitch used to derive µm per pixel (legacy ST)
    reader_options: dict = field(default_factory=dict)  # keyword options passed to the reader


@dataclass
class Manifest:
    path: Path
    name: str
    slides: list[SlideEntry]
    description: str = ""
    citation: str = ""
    base_url: str | None = None
    search_roots: list[Path] = field(default_factory=list)

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.slides]

    def slide(self, slide_id: str) -> SlideEntry:
        for s in self.slides:
            if s.slide_id == slide_id:
                return s
        raise GnnstError(f"{self.path}: no slide '{slide_id}' (slides: {', '.join(self.slide_ids)})")

    def select(self, slide_ids: list[str] | None) -> list[SlideEntry]:
        return list(self.slides) if slide_ids is None else [self.slide(s) for s in slide_ids]


def _check_keys(d: dict, allowed: set[str], file: Path, where: str) -> None:
    if not isinstance(d, dict):
        raise GnnstError(f"{file}: '{where}' must be a mapping, got {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise GnnstError(f"{file}: unknown manifest key '{where}.{unknown[0]}' (known: {', '.join(sorted(allowed))})")


def _scale(d: dict | None, file: Path, where: str) -> dict:
    if d is None:
        return {}
    _check_keys(d, _SCALE_KEYS, file, where)
    for k, v in d.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise GnnstError(f"{file}: '{where}.{k}' must be a positive number, got {v!r}")
    return d


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; unknown keys and missing fields raise, naming file and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GnnstError(f"manifest not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GnnstError(f"{path}: not valid YAML ({e})") from None
    _check_keys(raw, _TOP_KEYS, path, "<top>")
    for req in ("name", "slides"):
        if req not in raw:
            raise GnnstError(f"{path}: manifest key '{req}' is missing")
    default_reader = raw.get("reader")
    default_options = raw.get("reader_options") or {}
    if not isinstance(default_options, dict):
        raise GnnstError(f"{path}: 'reader_options' must be a mapping, got {default_options!r}")
    default_scale = _scale(raw.get("scale"), path, "scale")
    source = raw.get("source") or {}
    _check_keys(source, _SOURCE_KEYS, path, "source")
    if not isinstance(raw["slides"], list) or not raw["slides"]:
        raise GnnstError(f"{path}: 'slides' must be a non-empty list")
    slides, seen = [], set()
    for i, s in enumerate(raw["slides"]):
        where = f"slides[{i}]"
        _check_keys(s, _SLIDE_KEYS, path, where)
        if "slide_id" not in s:
            raise GnnstError(f"{path}: '{where}.slide_id' is missing")
        sid = str(s["slide_id"])
        if sid in seen:
            raise GnnstError(f"{path}: duplicate slide_id '{sid}'")
        seen.add(sid)
        reader = s.get("reader", default_reader)
        if reader is None:
            raise GnnstError(f"{path}: '{where}.reader' is missing and there is no default 'reader'")
        from gnnst.data.readers import READERS, check_reader_options, check_roles

        if reader not in READERS:
            raise GnnstError(f"{path}: '{where}.reader' = '{reader}' is unknown (known: {', '.join(sorted(READERS))})")
        options = s.get("reader_options") or {}
        if not isinstance(options, dict):
            raise GnnstError(f"{path}: '{where}.reader_options' must be a mapping, got {options!r}")
        options = {**(default_options if reader == default_reader else {}), **options}
        check_reader_options(reader, options, where=f"{path}: slide '{sid}' reader_options")
        files = {}
        if not isinstance(s.get("files"), dict) or not s["files"]:
            raise GnnstError(f"{path}: '{where}.files' must map roles to files")
        for role, f in s["files"].items():
            if isinstance(f, str):
                f = {"path": f}
            _check_keys(f, _FILE_KEYS, path, f"{where}.files.{role}")
            if "path" not in f:
                raise GnnstError(f"{path}: '{where}.files.{role}.path' is missing")
            sha = f.get("sha256")
            if sha is not None and sha != SKIP and not _SHA256.match(str(sha)):
                raise GnnstError(f"{path}: '{where}.files.{role}.sha256' must be 64 hex digits or '{SKIP}', got {sha!r}")
            files[role] = FileEntry(role=role, path=str(f["path"]), sha256=None if sha in (None, SKIP) else str(sha),
                                    url=f.get("url"), skip_check=sha == SKIP)
        check_roles(reader, list(files), where=f"{path}: slide '{sid}'")
        scale = {**default_scale, **_scale(s.get("scale"), path, f"{where}.scale")}
        slides.append(SlideEntry(slide_id=sid, patient_id=None if s.get("patient_id") is None else str(s["patient_id"]),
                                 reader=reader, files=files, mpp=scale.get("mpp"), pitch_um=scale.get("pitch_um"),
                                 reader_options=options))
    roots = [(path.parent / r).resolve() for r in raw.get("search_roots") or []]
    return Manifest(path=path, name=str(raw["name"]), slides=slides, description=str(raw.get("description", "")),
                    citation=str(raw.get("citation", "")), base_url=source.get("base_url"), search_roots=roots)


def cache_root(cache_dir: str | None = None) -> Path:
    """The download and embedding cache: ``cache_dir`` > ``$GNNST_CACHE`` > ``~/.cache/gnnst``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gnnst").expanduser()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_sha256(reader: str, folder: Path) -> tuple[str, list[Path]]:
    """The checksum of a folder role: sha256 of its listing (see the module docstring), and the files listed."""
    from gnnst.data.readers import folder_files

    folder = Path(folder)
    used = sorted(folder_files(reader, folder), key=lambda p: p.relative_to(folder).as_posix())
    listing = "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in used)
    return hashlib.sha256(listing.encode()).hexdigest(), used


def candidate_roots(manifest: Manifest, data_root: str | None, cache_dir: str | None) -> list[Path]:
    """Where the manifest's files are looked for, in order."""
    roots: list[Path] = []
    if data_root:
        roots.append(Path(data_root).expanduser())
    elif os.environ.get(DATA_ROOT_ENV):
        roots.append(Path(os.environ[DATA_ROOT_ENV]).expanduser())
    roots += manifest.search_roots
    roots.append(cache_root(cache_dir) / "data" / manifest.name)
    return roots


def resolve_files(
    manifest: Manifest,
    slide: SlideEntry,
    *,
    data_root: str | None = None,
    cache_dir: str | None = None,
    download: bool = True,
    verify: bool = True,
) -> dict[str, Path]:
    """Role -> local path for every file of ``slide``, downloading and checking as needed.

    With an explicit ``data_root`` only that root (then the cache) is searched. A role may name a
    folder (see the module docstring). Checksums are verified whenever the manifest gives one; a
    mismatch is an error naming the file and both digests; ``sha256: skip`` logs a warning instead.
    """
    roots = candidate_roots(manifest, data_root, cache_dir)
    if data_root:
        roots = [roots[0], roots[-1]]
    out = {}
    for role, f in slide.files.items():
        found = next((r / f.path for r in roots if (r / f.path).exists()), None)
        if found is None:
            found = _download(manifest, f, roots, cache_root(cache_dir) / "data" / manifest.name, download)
        if verify and f.skip_check:
            log.warning("%s: slide '%s' %s %s is not checksummed (sha256: skip in %s)", found, slide.slide_id, role,
                        "folder" if found.is_dir() else "file", manifest.path)
        elif verify and f.sha256 and found.is_dir():
            digest, used = folder_sha256(slide.reader, found)
            if digest != f.sha256.lower():
                raise GnnstError(f"{found}: checksum mismatch for '{slide.slide_id}' {role} (sha256 of the listing of "
                                 f"{len(used)} files {digest}, manifest {manifest.path} says {f.sha256})")
        elif verify and f.sha256:
            digest = sha256_file(found)
            if digest != f.sha256.lower():
                raise GnnstError(f"{found}: checksum mismatch for '{slide.slide_id}' {role} "
                                 f"(sha256 {digest[:12]}..., manifest {manifest.path} says {f.sha256[:12]}...)")
        out[role] = found
    return out


def _download(manifest: Manifest, f: FileEntry, roots: list[Path], dest_root: Path, allowed: bool) -> Path:
    looked = ", ".join(str(r / f.path) for r in roots)
    if f.url is None:
        raise GnnstError(f"file '{f.path}' of {manifest.path} not found (looked in: {looked}) and the manifest "
                         f"gives no url to download it from; set --data-root or ${DATA_ROOT_ENV}")
    url = f.url if "://" in f.url else (manifest.base_url or "").rstrip("/") + "/" + f.url.lstrip("/")
    if not allowed:
        raise GnnstError(f"file '{f.path}' not found (looked in: {looked}); downloads are off "
                         f"(data.download=false); get it from {url}")
    import urllib.request

    from gnnst.io import atomic_path

    dest = dest_root / f.path
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as out:
                while block := r.read(1 << 20):
                    out.write(block)
            if f.sha256 and sha256_file(tmp) != f.sha256.lower():
                raise GnnstError(f"downloaded {url} does not match the sha256 in {manifest.path}; not kept")
    except GnnstError:
        raise
    except Exception as e:
        raise GnnstError(f"file '{f.path}' not found (looked in: {looked}) and downloading {url} failed "
                         f"({type(e).__name__}: {e}); set --data-root or ${DATA_ROOT_ENV}") from None
    return dest
