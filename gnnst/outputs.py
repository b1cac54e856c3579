"""Where a command writes: output paths checked before any work, and the rules of a run folder.

Every command checks its outputs before it reads or encodes anything: an ``--out`` folder that is an
existing file, a folder (or the nearest existing parent of one to be made) where no file can be
created, a file ``--out`` that is an existing folder, each is a one-line :class:`~gnnst.errors.GnnstError`
(:func:`check_output_dir`, :func:`check_output_file`). Writability is tested by creating and removing
a temporary file, so read-only mounts and permissions count alike.

A run folder (``gnnst train``, ``gnnst ablate``, ``gnnst build-graphs``: :data:`TRAIN_RUN`,
:data:`ABLATION`, :data:`GRAPHS`) holds one run, made with one config (:class:`RunFolder`):

- a new run into a folder that holds a run (any entry the command writes, :attr:`FolderKind.owned`)
  is refused unless ``overwrite``; with ``overwrite`` the old run's entries are removed when the new
  run starts writing (after its inputs are read and checked), and a folder that also holds entries
  gnnst did not write is refused, so a user's own files are never removed;
- ``resume`` compares the folder's ``config.yaml`` with the new resolved config and refuses, naming
  the keys, unless only keys of :data:`gnnst.config.RESULT_NEUTRAL` differ;
- so the folds, settings or graphs of an earlier run never mix with this one's ``metrics.json``,
  predictions or exports.

Nothing is created in the folder (not even the log) until :meth:`RunFolder.begin`: the command's log
file is held in memory until then (:class:`DeferredFileHandler`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from gnnst.config import Config

log = logging.getLogger("gnnst")

CONFIG_FILE = "config.yaml"  # the resolved config, in every run folder


# ------------------------------------------------------------------------------ output paths
def _writable_parent(folder: Path, flag: str, shown: Path) -> Path:
    """The nearest existing folder at or above ``folder``, checked to accept a new file (by creating and
    removing one: permissions, read-only mounts and ACLs all count); ``shown``: the path in messages."""
    d = folder
    while not d.exists() and d.parent != d:
        d = d.parent
    if not d.is_dir():
        raise GnnstError(f"{flag} {shown}: cannot be created ({d} is a file, not a folder)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gnnst-write-check.", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise GnnstError(f"{flag} {shown}: cannot write here (a new file in {d} fails: {e.strerror or e})") from None
    return d


def check_output_dir(path: str | Path, *, flag: str = "--out") -> Path:
    """``path`` can be (or already is) a folder gnnst writes into; nothing is created. Raises a
    :class:`GnnstError` naming ``flag`` and the path otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GnnstError(f"{flag} {p}: exists and is a file, not a folder; give a folder")
    _writable_parent(p, flag, p)
    return p


def check_output_file(path: str | Path, *, flag: str = "--out", suffix: str | None = None) -> Path:
    """``path`` can be written as a file (an existing file is replaced); nothing is created."""
    p = Path(path)
    if p.is_dir():
        raise GnnstError(f"{flag} {p}: is a folder; give a file name, e.g. {p / ('predictions' + (suffix or ''))}")
    if suffix is not None and p.suffix != suffix:
        raise GnnstError(f"{flag} must end in {suffix}, got {p}")
    _writable_parent(p.parent, flag, p)
    return p


# ------------------------------------------------------------------------------ run folders
@dataclass(frozen=True)
class FolderKind:
    """What one command writes into its output folder.

    Attributes:
        command: the command (``gnnst train``).
        what: the folder in words (``a train run``).
        owned: patterns (fnmatch) of the top-level entries the command writes.
        markers: entries only this command writes: they tell which kind of run a folder holds.
        resumable: the command has ``--resume``.
    """

    command: str
    what: str
    owned: tuple[str, ...]
    markers: tuple[str, ...]
    resumable: bool = True

    def owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.owned + (".*.tmp",))  # + atomic-write leftovers


TRAIN_RUN = FolderKind(  # gnnst.eval.crossval (ablation_timing.json: a setting folder of gnnst ablate)
    "gnnst train", "a train run",
    owned=(CONFIG_FILE, "train.log", "metrics.json", "folds", "predictions", "final", "figures",
           "ablation_timing.json"),
    markers=("metrics.json", "folds", "predictions", "final"))
ABLATION = FolderKind(  # gnnst.eval.ablation
    "gnnst ablate", "an ablation",
    owned=(CONFIG_FILE, "ablate.log", "settings", "ablation.csv", "ablation.md", "ablation.png"),
    markers=("settings", "ablation.csv", "ablation.md", "ablation.png"))
GRAPHS = FolderKind(  # gnnst.graph.dataset
    "gnnst build-graphs", "a graph folder", owned=(CONFIG_FILE, "build.log", "dataset.json", "*.pt"),
    markers=("dataset.json",), resumable=False)
KINDS = (TRAIN_RUN, ABLATION, GRAPHS)


def _show(v: Any) -> str:
    import json

    return "<absent>" if v is _ABSENT else json.dumps(v)


_ABSENT = object()


class RunFolder:
    """The output folder of one run (rules: module docstring). Construct it before any work (it only
    checks, and raises a one-line :class:`GnnstError`); call :meth:`begin` when the inputs are read and
    checked, just before the first output is written.

    Args:
        path: the folder (``--out``).
        kind: what the command writes (:data:`TRAIN_RUN`, :data:`ABLATION`, :data:`GRAPHS`).
        cfg: the resolved config of the new run.
        resume: continue the run in ``path`` (its config must equal ``cfg`` up to
            :data:`gnnst.config.RESULT_NEUTRAL` keys); an empty or absent folder starts a new run.
        overwrite: replace the run in ``path`` (its entries are removed by :meth:`begin`).
        flag: the option that named ``path``, for messages.
    """

    def __init__(self, path: str | Path, kind: FolderKind, cfg: "Config", *, resume: bool = False,
                 overwrite: bool = False, flag: str = "--out"):
        self.path, self.kind, self.cfg, self.resume, self.overwrite = Path(path), kind, cfg, resume, overwrite
        if resume and overwrite:
            raise GnnstError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        check_output_dir(self.path, flag=flag)
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        self.old = [n for n in entries if kind.owns(n)]  # what begin() removes under overwrite
        run = [n for n in self.old if not n.startswith(".")]  # (not just leftover temporary files)
        other = next((k for k in KINDS if k is not kind and any(n in k.markers for n in entries)), None)
        if other is not None:
            raise GnnstError(f"{flag} {self.path} holds {other.what} (of `{other.command}`), not {kind.what}; "
                             f"choose another {flag}")
        if not run:
            if resume:
                log.info("%s holds no run to resume: starting a new one", self.path)
                self.resume = False
            return
        if resume:
            self._check_resume(flag)
        elif not overwrite:
            how = "continue it with --resume, replace it" if kind.resumable else "replace it"
            raise GnnstError(f"{flag} {self.path} already holds {kind.what} ({', '.join(run[:4])}): {how} with "
                             f"--overwrite, or choose another {flag}")
        else:
            foreign = [n for n in entries if not kind.owns(n)]
            if foreign:
                raise GnnstError(f"--overwrite: {self.path} also holds '{foreign[0]}', which `{kind.command}` did not "
                                 f"write; gnnst removes only its own outputs: move it or choose another {flag}")

    def _check_resume(self, flag: str) -> None:
        import yaml

        from gnnst.config import RESULT_NEUTRAL, config_diff, config_to_dict, flat_config

        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise GnnstError(f"--resume: {self.path} holds part of {self.kind.what} but no {CONFIG_FILE}, so its "
                             f"config is unknown; start again with --overwrite or choose another {flag}")
        try:
            old = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise GnnstError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None
        if not isinstance(old, dict):
            raise GnnstError(f"--resume: {path} is not a config (top level is not a mapping)")
        new = config_to_dict(self.cfg)
        diff = config_diff(old, new)
        changed = [k for k in diff if k not in RESULT_NEUTRAL]
        if changed:
            fo, fn = flat_config(old), flat_config(new)
            shown = "; ".join(f"{k}: {_show(fo.get(k, _ABSENT))} -> {_show(fn.get(k, _ABSENT))}" for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise GnnstError(f"--resume: {self.path} was run with another config ({shown}{more}); a run never mixes "
                             f"two configs: resume with the same config, or start a new run (--overwrite, or another "
                             f"{flag})")
        if diff:
            log.info("resuming %s with changed keys that do not change results: %s", self.path, ", ".join(diff))

    def begin(self, *, write: bool = True) -> Path:
        """The inputs are read and checked: remove the old run under ``overwrite``, create the folder,
        write ``config.yaml`` and open the command's log file there (:func:`open_log`). ``write=False``
        (a non-main distributed process) only returns the path."""
        from gnnst.config import dump_config

        if not write:
            return self.path
        if self.overwrite and self.old:
            log.info("--overwrite: removing the earlier run in %s (%s)", self.path, ", ".join(self.old))
            for name in self.old:
                p = self.path / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            self.old = []
        self.path.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.path / CONFIG_FILE)
        open_log(self.path)
        return self.path


# ------------------------------------------------------------------------------ the log file
class DeferredFileHandler(logging.Handler):
    """A log file in a folder that does not exist yet: records are kept in memory until :func:`open_log`
    is called for the folder (the command created it), then written there with every later record. A
    command that fails before that leaves no log file (its log went to stderr).

    Args:
        folder: the output folder.
        filename: the log file's name in it (``train.log``).
    """

    def __init__(self, folder: str | Path, filename: str):
        super().__init__()
        self.folder = Path(folder)
        self.filename = filename
        self._buffer: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        else:
            self._buffer.append(record)

    def open(self) -> None:
        if self._file is not None:
            return
        self._file = logging.FileHandler(self.folder / self.filename)
        self._file.setFormatter(self.formatter)
        for record in self._buffer:
            self._file.emit(record)
        self._buffer = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._buffer = []
        super().close()


def open_log(folder: str | Path) -> None:
    """Start writing the deferred log file(s) of ``folder`` (see :class:`DeferredFileHandler`)."""
    folder = Path(folder).resolve()
    for h in logging.getLogger("gnnst").handlers:
        if isinstance(h, DeferredFileHandler) and h.folder.resolve() == folder:
            h.open()
