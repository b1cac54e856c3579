"""A fold's targets held file-backed (:class:`TargetFolder`), so that they do not grow with the cohort in RAM.

A fold needs two ``[N, G]`` arrays per slide: the normalised expression (``y`` of
:func:`gnnst.graph.dataset.make_graphs`) and its standardised copy (:func:`gnnst.train.prepare.scaled`), in the
storage dtype of ``x``. Held in memory that is spots x genes x 4 bytes twice, ~7.9 GB for 2 M spots at 492
genes. Instead each array is written once to a fold-private file and memory-mapped copy-on-write, as
:class:`gnnst.graph.store.GraphDataset` maps ``x``: ``Data.y`` stays a plain ``torch.Tensor`` (every consumer,
the samplers, validation, the models' retrieval banks, the baselines, reads it unchanged, bit for bit), and the
operating system pages in only the rows a batch touches.

Why not standardise lazily (keep one array and apply the scaler to a batch's rows)? It would halve the
arrays but still keep one in RAM, and every reader of ``g.y`` (three models' ``after_fit`` banks, validation,
the blend, the baselines) would have to know the scaler; here ``g.y`` keeps meaning "what the model fits".

The files are unlinked as soon as they are mapped (the mapping keeps the data; the kernel frees the disk
space when the last tensor over it is gone, also after a crash), so nothing is left behind. They live in
``tempfile.gettempdir()`` (``$TMPDIR``, ``/tmp``): put ``TMPDIR`` on a disk, not a RAM-backed tmpfs, for a
large cohort; the space needed is the fold's two arrays (e.g. 7.9 GB for 2 M spots x 492 genes, float32).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    import torch


class TargetFolder:
    """Fold-private, file-backed ``[N, G]`` arrays (see the module docstring); a context manager.

    Args:
        root: the folder to make the fold's folder in (default ``tempfile.gettempdir()``).

    :meth:`hold` turns an array into a tensor over a copy-on-write mapping of a file; :meth:`release` drops
    a held tensor's pages from this process (they stay in the file and the page cache, and are read back when
    touched again), so a pass over every slide does not keep them all resident. ``close`` (the end of the
    ``with`` block) removes the folder; the tensors stay valid.
    """

    def __init__(self, root: str | Path | None = None):
        parent = Path(root) if root is not None else Path(tempfile.gettempdir())
        try:
            self.path = Path(tempfile.mkdtemp(prefix="gnnst_targets_", dir=parent))
        except OSError as e:
            raise GnnstError(f"{parent}: cannot make a folder for the fold's targets ({e}); set TMPDIR to a "
                             "writable folder") from None
        self._maps: dict[int, mmap.mmap] = {}  # data_ptr of a held tensor -> its mapping
        self._count = 0
        self.bytes = 0  # written so far

    def __repr__(self) -> str:
        return f"TargetFolder('{self.path}', arrays={self._count}, bytes={self.bytes})"

    def __enter__(self) -> "TargetFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hold(self, y: np.ndarray) -> "torch.Tensor":
        """``y`` (any shape, e.g. ``[N, G]``) as a tensor of the same dtype and values over a copy-on-write
        mapping of a file of this folder (writable; a write stays private to this process)."""
        import torch

        y = np.ascontiguousarray(y)
        if y.nbytes == 0:  # an empty file cannot be mapped
            return torch.from_numpy(y.copy())
        path = self.path / f"{self._count}.bin"
        self._count += 1
        try:
            with open(path, "wb") as f:
                y.tofile(f)
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise GnnstError(f"{path}: cannot write the fold's arrays ({y.nbytes / 2**20:.0f} MB: {e}); set TMPDIR "
                             "to a folder on a disk with room for them") from None
        try:
            os.unlink(path)  # the mapping keeps the data; the space is freed with the last tensor over it
        except OSError:  # a system that cannot unlink an open file: removed by close()
            pass
        self.bytes += y.nbytes
        t = torch.from_numpy(np.frombuffer(mm, dtype=y.dtype).reshape(y.shape))
        self._maps[t.data_ptr()] = mm
        return t

    def release(self, t: "torch.Tensor") -> None:
        """Drop the pages of held tensor ``t`` from this process's memory (a no-op for any other tensor, or
        where the system has no ``MADV_DONTNEED``). Only for tensors nothing has written to: a private
        write would be lost (the library never writes targets in place)."""
        mm = self._maps.get(t.data_ptr())
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Remove the folder (its files are already unlinked where the system allows); held tensors stay valid."""
        self._maps.clear()
        shutil.rmtree(self.path, ignore_errors=True)
