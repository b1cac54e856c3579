"""The graph folder ``gnnst build-graphs`` writes and ``gnnst train`` reads: build once, train many.

A training run needs, per slide, what a fold needs to choose its gene panel honestly and to train:
the raw counts of the candidate genes, the embeddings ``x``, positions and the graph. The folder holds
all of it, so training never reads the raw counts or spot tables again (stain normalisation and
augmentation, :mod:`gnnst.graph.features`, re-embed patches from the slides' images, at the paths
``dataset.json`` records: :meth:`GraphDataset.image_slide`):

- ``<slide_id>.pt``: a ``torch_geometric.data.Data`` (attributes in :mod:`gnnst.keys`): ``x``, ``y`` (the
  folder's own panel, chosen on every slide: for looking at the graphs, never used by training),
  ``pos``, ``pixel`` (float64), ``edge_index``, ``edge_attr``, ``slide_id``, ``patient_id``, ``barcodes``,
  ``mpp`` and ``counts`` (:data:`COUNTS`: the raw counts, CSR, of every gene detected in at least
  ``expression.candidate_fraction`` of the spots of some slide, and each spot's total over all genes:
  :class:`gnnst.data.expression.SlideCounts`);
- ``dataset.json``: format, fingerprint of what the contents depend on, encoder, graph parameters, the
  folder's panel, per slide its node and edge counts, patient, µm per pixel, image and the checksums of
  its source files;
- ``config.yaml`` (the resolved config) and ``build.log``.

:class:`GraphDataset` reads it lazily: a slide is loaded when it is asked for, with its tensors
memory-mapped (``torch.load(mmap=True)``), so a cohort need not fit in memory; only what a batch
touches is read. Per fold, training holds in memory the graphs' edges and the gene-panel choice's dense
matrix (spots of the training slides x genes detected somewhere, float32, while the panel is chosen);
``x`` (spots x embedding width x 2 or 4 bytes) stays on disk, in the page cache, and so do the fold's
targets (``y``: spots x panel genes x 2 or 4 bytes, twice: measured and standardised), written to
fold-private files in ``$TMPDIR`` and memory-mapped (:class:`gnnst.graph.targets.TargetFolder`).

Training reads slides through :class:`SlideSource`, which both this folder and slides read and embedded
in memory (:class:`gnnst.graph.dataset.LoadedSlides`) implement, so a fold's panel, targets, scaling and
metrics are the same from either (checked by ``tests/graph/test_store.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData
    from torch_geometric.data import Data

    from gnnst.config import Config, GraphConfig
    from gnnst.data.expression import GenePanel, SlideCounts

log = logging.getLogger("gnnst")

DATASET_JSON = "dataset.json"
FORMAT = 2  # dataset.json "format": 2 = raw counts of the candidate genes in every slide (issue 13)
COUNTS = "counts"  # Data attribute: {'genes', 'data' [nnz], 'indices' [nnz], 'indptr' [N+1], 'totals' [N]}
IMAGE_ROLES = ("image", "zarr", "outs")  # manifest roles whose checksum covers a slide's image (a file or a folder)
CACHE_SLIDES = 16  # slides GraphDataset keeps loaded (memory-mapped; their barcodes in memory)
# keys of a run's config that the graph folder fixes (how x and the stored counts were made); a
# `--graphs` run takes them from the folder's config.yaml, and a value that differs is an error
DATASET_KEYS = ("data.manifest", "data.slides", "patch.size_um", "patch.pad_value", "encoder.name",
                "encoder.checkpoint", "encoder.timm_kwargs", "encoder.precision", "graph.storage",
                "expression.candidate_fraction")


@dataclass
class SpotInfo:
    """What the prediction writer needs of a slide's spots.

    Attributes:
        barcodes: spot ids, in node order.
        pixel: ``[N, 2]`` float64 full-resolution pixel (x, y).
        mpp: micrometres per full-resolution pixel.
        image_path: the slide's image (``None`` when unknown); image_scalef: its pixels per full-resolution pixel.
    """

    barcodes: list[str]
    pixel: np.ndarray
    mpp: float
    image_path: str | None
    image_scalef: float = 1.0


class SlideSource:
    """The slides a training run reads: the one input of cross-validation and of
    :func:`gnnst.train.prepare.prepare_training`.

    Subclasses provide ``slide_ids`` (in order), :meth:`patients`, ``embs`` (slide id -> ``[N, D]`` float32
    embeddings), ``encoder`` (the patch encoder's
    record: name, identity, input_size, dim, precision, ...), ``timer`` (a
    :class:`gnnst.data.embeddings.Timer`), and per slide :meth:`slide_counts`, :meth:`slide_graph`,
    :meth:`spots`, and for re-embedding its patches (stain normalisation and augmentation,
    :func:`gnnst.graph.features.fold_features`) :meth:`image_slide` and :meth:`image_id`.
    """

    slide_ids: list[str]
    encoder: dict
    timer: Any

    def patients(self) -> dict[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def slide_counts(self, slide_id: str) -> "SlideCounts":  # pragma: no cover - abstract
        """The raw counts a panel is chosen on and targets are computed from."""
        raise NotImplementedError

    def slide_graph(self, slide_id: str, graph: "GraphConfig") -> "Data":  # pragma: no cover - abstract
        """The slide's graph for ``graph.k``/``graph.radius_um``: ``x`` (``graph.storage`` dtype), ``pos``,
        ``pixel``, ``edge_index``, ``edge_attr``, ``slide_id``, ``patient_id``; no ``y``."""
        raise NotImplementedError

    def spots(self, slide_id: str) -> SpotInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_slide(self, slide_id: str) -> "AnnData":  # pragma: no cover - abstract
        """The slide's spots on its image, without expression (``obsm['spatial']``, ``obs['slide_id']``,
        ``uns['gnnst']`` with the image path and µm per pixel): what patches are cut from."""
        raise NotImplementedError

    def image_id(self, slide_id: str) -> str | None:  # pragma: no cover - abstract
        """The checksum that names the slide's image in the embedding cache (``None``: path, size and
        modification time name it)."""
        raise NotImplementedError


class SlideEmbeddings:
    """``[slide_id] -> [N, D]`` float32 numpy embeddings of a :class:`GraphDataset`, read lazily."""

    def __init__(self, ds: "GraphDataset"):
        self.ds = ds

    def __getitem__(self, slide_id: str) -> np.ndarray:
        import torch

        x = self.ds[slide_id].x
        return x.numpy() if x.dtype == torch.float32 else x.float().numpy()


# ------------------------------------------------------------------------------ counts in a Data
def counts_to_data(c: "SlideCounts") -> dict:
    """:class:`SlideCounts` as the ``counts`` attribute of a slide's ``Data`` (tensors, memory-mappable)."""
    import torch

    m = c.counts
    return {"genes": list(c.genes), "data": torch.from_numpy(np.ascontiguousarray(m.data, dtype=np.float32)),
            "indices": torch.from_numpy(np.ascontiguousarray(m.indices, dtype=np.int32)),
            "indptr": torch.from_numpy(np.ascontiguousarray(m.indptr, dtype=np.int64)),
            "totals": torch.from_numpy(np.ascontiguousarray(c.totals, dtype=np.float32))}


def counts_from_data(data: "Data") -> "SlideCounts":
    """The :class:`SlideCounts` stored in a slide's ``Data`` (views of its tensors, no copy)."""
    import scipy.sparse as sp

    from gnnst.data.expression import SlideCounts

    d = data[COUNTS]
    n = int(data.num_nodes)
    m = sp.csr_matrix((d["data"].numpy(), d["indices"].numpy(), d["indptr"].numpy()), shape=(n, len(d["genes"])),
                      copy=False)
    return SlideCounts(slide_id=str(data.slide_id), genes=list(d["genes"]), counts=m, totals=d["totals"].numpy())


# ------------------------------------------------------------------------------ fingerprints
def _source_record(manifest, entry, cfg: "Config") -> dict:
    """Role -> {path, sha256, bytes, mtime_ns} of a slide's source files, as found now (sha256: the
    manifest's, verified when the slide was read, else computed here)."""
    from gnnst.data.manifest import folder_sha256, resolve_files, sha256_file

    files = resolve_files(manifest, entry, data_root=cfg.data.data_root, cache_dir=cfg.data.cache_dir,
                          download=False, verify=False)
    out = {}
    for role, path in files.items():
        f = entry.files[role]
        if f.sha256:
            digest = f.sha256.lower()
        elif path.is_dir():
            digest = folder_sha256(entry.reader, path)[0]
        else:
            digest = sha256_file(path)
        st = path.stat()
        out[role] = {"path": str(path.resolve()), "sha256": digest, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def fingerprint(cfg: "Config") -> str:
    """Digest of everything a graph folder's contents depend on, except the graph's ``k``/``radius_um``
    (edges are cheap to rebuild from the stored positions): the manifest's selected slides (ids,
    patients, readers, files and their checksums, scales, options), patch, encoder, storage and
    candidate-gene settings, and the folder format."""
    from gnnst.data.manifest import load_manifest

    m = load_manifest(cfg.data.manifest)
    slides = [{"slide_id": e.slide_id, "patient_id": e.patient_id, "reader": e.reader, "mpp": e.mpp,
               "pitch_um": e.pitch_um, "reader_options": e.reader_options,
               "files": {r: [f.path, f.sha256] for r, f in sorted(e.files.items())}}
              for e in m.select(cfg.data.slides)]
    enc = cfg.encoder
    parts = {"format": FORMAT, "manifest": m.name, "slides": slides, "patch": [cfg.patch.size_um, cfg.patch.pad_value],
             "encoder": [enc.name, enc.checkpoint, enc.timm_kwargs, enc.precision], "storage": cfg.graph.storage,
             "candidate_fraction": cfg.expression.candidate_fraction}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------ the folder
class GraphDataset(SlideSource):
    """The graphs of a ``build-graphs`` output folder, read lazily (see the module docstring).

    Args:
        root: the folder holding ``dataset.json`` and ``<slide_id>.pt``.

    ``ds[slide_id]`` is that slide's ``Data`` as stored (tensors memory-mapped); ``ds.slide_ids``,
    ``ds.panel`` (the folder's own panel), ``ds.info`` (``dataset.json``). As a :class:`SlideSource` it
    gives every fold its counts and graphs without touching the raw slides.
    """

    def __init__(self, root: str | Path):
        from gnnst.data.embeddings import Timer
        from gnnst.data.expression import GenePanel

        self.root = Path(root)
        meta = self.root / DATASET_JSON
        if not self.root.is_dir():
            raise GnnstError(f"graph folder not found: {self.root}")
        if not meta.is_file():
            raise GnnstError(f"{self.root}: no {DATASET_JSON}; build it with `gnnst build-graphs --out {self.root}`")
        try:
            self.info = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise GnnstError(f"{meta}: corrupt JSON ({e})") from None
        if self.info.get("format") != FORMAT:
            raise GnnstError(f"{meta}: a graph folder of format {self.info.get('format', 1)} (gnnst "
                             f"{self.info.get('gnnst_version', '?')}) without what training needs; this gnnst reads "
                             f"format {FORMAT}: rebuild it with `gnnst build-graphs ... --out {self.root} --overwrite`")
        self.panel: "GenePanel" = GenePanel.from_dict(self.info["panel"])
        self.encoder = {**self.info["encoder"], "dim": int(self.info["embedding_dim"])}
        self.timer = Timer()
        self._loaded: OrderedDict[str, "Data"] = OrderedDict()

    # --- the folder as a mapping of slides
    @property
    def slide_ids(self) -> list[str]:
        return list(self.info["slides"])

    def __len__(self) -> int:
        return len(self.info["slides"])

    def __getitem__(self, slide_id: str) -> "Data":
        import torch

        if slide_id not in self.info["slides"]:
            raise GnnstError(f"{self.root}: no slide '{slide_id}' (slides: {', '.join(self.slide_ids)})")
        if slide_id in self._loaded:
            self._loaded.move_to_end(slide_id)
            return self._loaded[slide_id]
        path = self.root / self.info["slides"][slide_id]["file"]
        try:
            with self.timer("load"):
                data = torch.load(path, weights_only=False, mmap=True)
        except Exception as e:
            raise GnnstError(f"{path}: cannot load graph ({type(e).__name__}: {e})") from None
        self._loaded[slide_id] = data
        while len(self._loaded) > CACHE_SLIDES:
            self._loaded.popitem(last=False)
        return data

    def __repr__(self) -> str:
        return (f"GraphDataset('{self.root}', slides={len(self)}, nodes={self.info['total_nodes']}, "
                f"genes={self.info['num_genes']}, dim={self.info['embedding_dim']})")

    # --- SlideSource
    def patients(self) -> dict[str, str]:
        return {s: v["patient_id"] for s, v in self.info["slides"].items()}

    @property
    def embs(self) -> "SlideEmbeddings":
        """Slide id -> ``[N, D]`` float32 embeddings (``x``; a view of the memory-mapped file when stored as
        float32), read when asked for: as :attr:`gnnst.graph.dataset.LoadedSlides.embs`."""
        return SlideEmbeddings(self)

    def slide_counts(self, slide_id: str) -> "SlideCounts":
        return counts_from_data(self[slide_id])

    def slide_graph(self, slide_id: str, graph: "GraphConfig") -> "Data":
        import torch
        from torch_geometric.data import Data

        from gnnst.graph.edges import slide_graph

        d = self[slide_id]
        out = Data(x=d.x, pos=d.pos, pixel=d.pixel, edge_index=d.edge_index, edge_attr=d.edge_attr,
                   num_nodes=int(d.num_nodes))
        built = self.info["graph"]
        if (graph.k, graph.radius_um) != (built["k"], built["radius_um"]):  # edges for this run's graph
            with self.timer("graph"):
                sg = slide_graph(d.pixel.numpy().astype(np.float64), float(d.mpp), k=graph.k, radius_um=graph.radius_um)
            out.pos = torch.from_numpy(sg.pos.astype(np.float32))
            out.edge_index, out.edge_attr = torch.from_numpy(sg.edge_index), torch.from_numpy(sg.edge_attr)
        out.slide_id, out.patient_id = str(d.slide_id), str(d.patient_id)
        return out

    def spots(self, slide_id: str) -> SpotInfo:
        d, v = self[slide_id], self.info["slides"][slide_id]
        return SpotInfo(barcodes=list(d.barcodes), pixel=d.pixel.numpy().astype(np.float64), mpp=float(v["mpp"]),
                        image_path=v.get("image_path"), image_scalef=float(v.get("image_scalef", 1.0)))

    def image_slide(self, slide_id: str) -> "AnnData":
        """The slide's spots on the image recorded at the build (``dataset.json``), which must still be
        there, unchanged in size (a one-line error names the slide, the file and the key that needs it)."""
        from gnnst.data.slides import spots_anndata

        info, why = self.spots(slide_id), None
        rec = self._image_record(slide_id)
        path = info.image_path
        if not path:
            why = "no image recorded"
        elif not Path(path).exists():
            why = f"its image {path} (recorded in {self.root / DATASET_JSON}) is not there"
        elif rec is not None and Path(rec["path"]) == Path(path).resolve() and Path(path).is_file() \
                and Path(path).stat().st_size != rec["bytes"]:
            why = f"its image {path} changed since the graphs were built ({rec['bytes']} bytes then)"
        if why:
            raise GnnstError(f"{self.root}: slide '{slide_id}': {why}; stain normalisation and augmentation "
                             "(features.stain_norm, features.stain_augment) re-embed the slide's patches from it: "
                             "set features.stain_norm=none and features.stain_augment=0, or rebuild the graphs")
        return spots_anndata(info.pixel, info.barcodes, slide_id=slide_id, mpp=info.mpp, image=path,
                             image_scalef=info.image_scalef)

    def image_id(self, slide_id: str) -> str | None:
        rec = self._image_record(slide_id)
        return None if rec is None else rec.get("sha256")

    def _image_record(self, slide_id: str) -> dict | None:
        """The build's record (path, sha256, bytes) of the file or folder holding the slide's image."""
        sources = self.info["slides"][slide_id].get("sources", {})
        return next((sources[r] for r in IMAGE_ROLES if r in sources), None)

    # --- a run's config against the folder
    def config_base(self) -> dict:
        """The :data:`DATASET_KEYS` of the folder's ``config.yaml`` as a nested dict: the layer between the
        defaults and a ``--graphs`` run's own YAML (:func:`gnnst.config.load_config`'s ``base``)."""
        import yaml

        from gnnst.config import flat_config

        path = self.root / "config.yaml"
        if not path.is_file():
            raise GnnstError(f"{self.root}: no config.yaml (the config the graphs were built with)")
        flat = flat_config(yaml.safe_load(path.read_text()) or {})
        out: dict = {}
        for key in DATASET_KEYS:
            if key in flat:
                section, name = key.split(".")
                out.setdefault(section, {})[name] = flat[key]
        return out

    def check_config(self, cfg: "Config") -> None:
        """A run's config agrees with the folder on every :data:`DATASET_KEYS` key (one line naming the
        first that differs), and its ``expression.min_spot_fraction`` can choose panels among the stored
        candidate genes."""
        from gnnst.config import config_to_dict, flat_config
        from gnnst.data.encoders import default_patch_um

        built, run = flat_config(self.config_base()), flat_config(config_to_dict(cfg))
        if run.get("patch.size_um") is None:  # null: the encoder's own, as the build resolved it
            run["patch.size_um"] = default_patch_um(cfg.encoder.name)
        for key in DATASET_KEYS:
            a, b = built.get(key), run.get(key)
            if key == "data.manifest" and a is not None and b is not None:
                a, b = str(Path(a).resolve()), str(Path(b).resolve())
            if key in built and a != b:
                raise GnnstError(f"config key '{key}': {run.get(key)!r} differs from {built[key]!r}, the value the "
                                 f"graphs in {self.root} were built with; drop it, or build graphs for it")
        fraction = float(self.info["candidate_fraction"])
        if cfg.expression.min_spot_fraction < fraction - 1e-12:
            raise GnnstError(f"config key 'expression.min_spot_fraction': {cfg.expression.min_spot_fraction} is below "
                             f"{fraction}, the detection fraction of the candidate genes stored in {self.root}; "
                             "rebuild the graphs with a smaller expression.candidate_fraction")

    def sources_changed(self, cfg: "Config") -> str | None:
        """The first source file found now whose size or modification time differs from the build's
        record (where the manifest gives no checksum), as a message; ``None`` when none does or the
        files are not at hand (the folder stands in for them)."""
        from gnnst.data.manifest import load_manifest, resolve_files

        m = load_manifest(cfg.data.manifest)
        for e in m.select(cfg.data.slides):
            rec = self.info["slides"].get(e.slide_id, {}).get("sources", {})
            try:
                files = resolve_files(m, e, data_root=cfg.data.data_root, cache_dir=cfg.data.cache_dir,
                                      download=False, verify=False)
            except GnnstError:
                return None
            for role, path in files.items():
                r = rec.get(role)
                if r is None:
                    return f"slide '{e.slide_id}' {role}: not recorded"
                st = path.stat()
                if not e.files[role].sha256 and (st.st_size, st.st_mtime_ns) != (r["bytes"], r["mtime_ns"]):
                    return f"{path} changed since the graphs were built"
        return None


def dataset_info(loaded, cfg: "Config", panel: "GenePanel", slides_info: dict, candidates: int) -> dict:
    """The content of ``dataset.json`` (see the module docstring)."""
    from gnnst import __version__

    return {
        "format": FORMAT,
        "gnnst_version": __version__,
        "fingerprint": fingerprint(cfg),
        "dataset": loaded.manifest.name,
        "manifest": str(loaded.manifest.path),
        "encoder": {k: loaded.encoder.get(k) for k in ("name", "identity", "input_size", "precision", "checkpoint",
                                                        "timm_kwargs")},
        "embedding_dim": int(loaded.encoder["dim"]),
        "patch_size_um": cfg.patch.size_um,
        "graph": {"k": cfg.graph.k, "radius_um": cfg.graph.radius_um, "storage": cfg.graph.storage},
        "expression": {"target_sum": cfg.expression.target_sum, "log1p": cfg.expression.log1p},
        "candidate_fraction": cfg.expression.candidate_fraction,
        "num_candidate_genes": candidates,
        "panel": panel.to_dict(),
        "num_genes": len(panel.genes),
        "slides": slides_info,
        "total_nodes": int(sum(v["nodes"] for v in slides_info.values())),
    }
