"""Data manifests: what a dataset is made of (files, checksums, sources), never the data itself.

Format (YAML)::

    name: her2st                   # dataset name
    description: ...               # free text
    citation: ...                  # free text
    reader: legacy_st              # default reader (gnnst.data.readers.READERS) for every slide
    scale: {pitch_um: 200}         # default scale: {mpp: 0.5} or {pitch_um: 200} (derived by the reader)
    source: {base_url: https://...}  # files' public source; a file's url is joined to it
    search_roots: [../../shared/data/her2st]  # extra data roots, relative to this manifest file
    slides:
      - slide_id: B4               # unique within the manifest
        patient_id: B              # folds are by patient where patients are known
        reader: legacy_st          # optional, overrides the default
        scale: {mpp: 0.69}         # optional, overrides the default
        files:                     # role -> file; roles are the reader's path arguments
          counts: {path: B4.tsv.gz, sha256: e382..., url: data/ST-cnts/B4.tsv.gz}

Data root: ``--data-root`` > ``$GNNST_DATA_ROOT`` > the manifest's ``search_roots`` > the download cache
(``$GNNST_CACHE`` or ``~/.cache/gnnst``)/data/<name>. A file missing from all of them is downloaded
from its public source into the cache and checked against its sha256; without network the error names
the file and every place looked.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from gnnst.errors import GnnstError

DATA_ROOT_ENV = "GNNST_DATA_ROOT"
CACHE_ENV = "GNNST_CACHE"

_TOP_KEYS = {"name", "description", "citation", "reader", "scale", "source", "search_roots", "slides"}
_SLIDE_KEYS = {"slide_id", "patient_id", "reader", "scale", "files"}
_FILE_KEYS = {"path", "sha256", "url"}
_SCALE_KEYS = {"mpp", "pitch_um"}
_SOURCE_KEYS = {"base_url"}


@dataclass
class FileEntry:
    role: str  # the reader argument this file is passed as
    path: str  # relative to the data root
    sha256: str | None = None  # expected checksum (hex)
    url: str | None = None  # public source (absolute, or relative to source.base_url)


@dataclass
class SlideEntry:
    slide_id: str
    patient_id: str | None
    reader: str
    files: dict[str, FileEntry]
    mpp: float | None = None  # fixed µm per pixel; None = derived by the reader
    pitch_um: float | None = None  # spot pitch used to derive µm per pixel (legacy ST)


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
        from gnnst.data.readers import READERS

        if reader not in READERS:
            raise GnnstError(f"{path}: '{where}.reader' = '{reader}' is unknown (known: {', '.join(sorted(READERS))})")
        files = {}
        if not isinstance(s.get("files"), dict) or not s["files"]:
            raise GnnstError(f"{path}: '{where}.files' must map roles to files")
        for role, f in s["files"].items():
            if isinstance(f, str):
                f = {"path": f}
            _check_keys(f, _FILE_KEYS, path, f"{where}.files.{role}")
            if "path" not in f:
                raise GnnstError(f"{path}: '{where}.files.{role}.path' is missing")
            files[role] = FileEntry(role=role, path=str(f["path"]), sha256=f.get("sha256"), url=f.get("url"))
        scale = {**default_scale, **_scale(s.get("scale"), path, f"{where}.scale")}
        slides.append(SlideEntry(slide_id=sid, patient_id=None if s.get("patient_id") is None else str(s["patient_id"]),
                                 reader=reader, files=files, mpp=scale.get("mpp"), pitch_um=scale.get("pitch_um")))
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

    With an explicit ``data_root`` only that root (then the cache) is searched. Checksums are verified
    whenever the manifest gives one; a mismatch is an error naming the file and both digests.
    """
    roots = candidate_roots(manifest, data_root, cache_dir)
    if data_root:
        roots = [roots[0], roots[-1]]
    out = {}
    for role, f in slide.files.items():
        found = next((r / f.path for r in roots if (r / f.path).is_file()), None)
        if found is None:
            found = _download(manifest, f, roots, cache_root(cache_dir) / "data" / manifest.name, download)
        if verify and f.sha256:
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
