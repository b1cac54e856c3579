"""Slides -> graphs: reading and embedding a manifest's slides (:func:`load_and_embed`, giving
:class:`LoadedSlides`), one PyG ``Data`` per slide (:func:`slide_to_data`, :func:`make_graphs`), and the
graph folder ``gnnst build-graphs`` writes (:func:`build_graphs`; built or reused in the cache for a run by
:func:`ensure_dataset`; its format and its reader,
:class:`~gnnst.graph.store.GraphDataset`, are in :mod:`gnnst.graph.store`).

Embeddings are cached apart from graphs (``<cache>/embeddings``), so a rebuild that changes only
``graph.k`` or ``graph.radius_um`` re-encodes nothing. Under ``torchrun`` the slides are shared out over
the ranks (:mod:`gnnst.data.sharding`) and rank 0 writes the folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from gnnst import keys
from gnnst.errors import GnnstError
from gnnst.graph.store import (COUNTS, DATASET_JSON, IMAGE_ROLES, GraphDataset, SlideSource,  # noqa: F401 (re-exported)
                               SpotInfo)

if TYPE_CHECKING:
    from anndata import AnnData
    from torch_geometric.data import Data

    from gnnst.config import Config, GraphConfig
    from gnnst.data.expression import GenePanel, SlideCounts
    from gnnst.graph.targets import TargetFolder

log = logging.getLogger("gnnst")


HALF_STORAGE_ABOVE = 200_000  # spots: ``storage="auto"`` keeps larger slides' x and y in float16


def storage_dtype(num_nodes: int, storage: str = "auto") -> "torch.dtype":
    """The dtype of a slide's ``x`` and ``y`` for ``GraphConfig.storage`` (``auto``: float16 above
    :data:`HALF_STORAGE_ABOVE` spots, where float32 ``x`` alone passes 1 GB; float32 otherwise)."""
    import torch

    if storage == "auto":
        storage = "float16" if num_nodes > HALF_STORAGE_ABOVE else "float32"
    if storage not in ("float32", "float16"):
        raise GnnstError(f"config key 'graph.storage': expected 'auto', 'float32' or 'float16', got {storage!r}")
    return getattr(torch, storage)


def slide_to_data(
    adata: "AnnData", emb: np.ndarray, y: np.ndarray | None, *, k: int | None, radius_um: float | None,
    storage: str = "auto",
) -> "Data":
    """One slide's PyG graph.

    Args:
        adata: canonical AnnData (pixels in ``obsm['spatial']``, ``uns['gnnst']['mpp']``).
        emb: patch embeddings ``[N, D]``.
        y: normalised expression of the panel ``[N, G]``, or ``None`` (unseen slide).
        k, radius_um: graph parameters (see :func:`gnnst.graph.edges.slide_graph`).
        storage: dtype of ``x`` and ``y`` (see :func:`storage_dtype`); the loader widens batches to float32.
    """
    import torch
    from torch_geometric.data import Data

    from gnnst.graph.edges import slide_graph

    pixel = np.asarray(adata.obsm[keys.SPATIAL], dtype=np.float64)  # [N, 2]
    sg = slide_graph(pixel, float(adata.uns[keys.UNS_GNNST][keys.MPP]), k=k, radius_um=radius_um)
    dt = storage_dtype(adata.n_obs, storage)
    np_dt = np.float16 if dt == torch.float16 else np.float32
    data = Data(
        x=torch.from_numpy(np.ascontiguousarray(emb, dtype=np_dt)),
        pos=torch.from_numpy(sg.pos.astype(np.float32)),
        edge_index=torch.from_numpy(sg.edge_index),
        edge_attr=torch.from_numpy(sg.edge_attr),
        num_nodes=adata.n_obs,
    )
    if y is not None:
        data.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np_dt))
    data.pixel = torch.from_numpy(pixel)  # float64: edges for another k are rebuilt from it exactly
    data.slide_id = str(adata.obs[keys.SLIDE_ID].iloc[0])
    data.barcodes = [str(b) for b in adata.obs_names]
    return data


@dataclass
class BuildResult:
    """What :func:`build_graphs` did: its ``dataset.json`` content (``None`` on ranks other than 0 under
    torchrun) and the seconds per stage."""

    info: dict | None
    timings: dict[str, float]


@dataclass
class LoadedSlides(SlideSource):
    """Slides read and embedded once (:func:`load_and_embed`), from which graphs for any gene panel are
    made cheaply: a :class:`~gnnst.graph.store.SlideSource` held in memory."""

    manifest: object  # gnnst.data.manifest.Manifest
    entries: list  # the manifest's SlideEntry of each slide, in order
    adatas: dict  # slide id -> canonical AnnData (raw counts)
    embs: dict  # slide id -> [N, D] patch embeddings
    encoder: dict  # PatchEncoder.record(): name, identity, input_size, dim, precision, patch_um, checkpoint...
    timer: object  # gnnst.data.embeddings.Timer
    alongside: object = None  # what load_and_embed's `alongside` returned

    @property
    def slide_ids(self) -> list[str]:
        return [e.slide_id for e in self.entries]

    def patients(self) -> dict[str, str]:
        return {e.slide_id: e.patient_id or e.slide_id for e in self.entries}

    def slide_counts(self, slide_id: str) -> "SlideCounts":
        from gnnst.data.expression import SlideCounts

        return SlideCounts.from_anndata(self.adatas[slide_id])  # not cached: adatas stay the one truth

    def slide_graph(self, slide_id: str, graph: "GraphConfig") -> "Data":
        data = slide_to_data(self.adatas[slide_id], self.embs[slide_id], None, k=graph.k, radius_um=graph.radius_um,
                             storage=graph.storage)
        del data.barcodes  # spots() has them; a fold's graphs need not hold every slide's
        data.patient_id = self.patients()[slide_id]
        return data

    def image_slide(self, slide_id: str) -> "AnnData":
        return self.adatas[slide_id]

    def image_id(self, slide_id: str) -> str | None:
        return image_checksum(next(e for e in self.entries if e.slide_id == slide_id))

    def spots(self, slide_id: str) -> SpotInfo:
        a = self.adatas[slide_id]
        meta = a.uns[keys.UNS_GNNST]
        return SpotInfo(barcodes=[str(b) for b in a.obs_names], pixel=np.asarray(a.obsm[keys.SPATIAL], dtype=np.float64),
                        mpp=float(meta[keys.MPP]), image_path=meta.get(keys.IMAGE_PATH),
                        image_scalef=float(meta.get(keys.IMAGE_SCALEF, 1.0)))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load_encoder(cfg: "Config", device, batch_size: int) -> tuple:
    """The configured encoder on ``device``, warmed up on CUDA with one batch of the run's shape (the
    cuDNN set-up, seconds, is then paid while the slides are read); and the seconds it took."""
    import torch

    from gnnst.data.encoders import create_encoder

    t0 = time.perf_counter()
    encoder = create_encoder(cfg.encoder.name, checkpoint=cfg.encoder.checkpoint,
                             timm_kwargs=cfg.encoder.timm_kwargs).to(device, cfg.encoder.precision)
    if device.type == "cuda":
        s = encoder.input_size
        encoder.embed(torch.zeros(batch_size, 3, s, s, device=device).contiguous(memory_format=torch.channels_last))
        torch.cuda.synchronize(device)
    return encoder, time.perf_counter() - t0




def image_checksum(entry) -> str | None:
    """The manifest's sha256 of the file or folder holding the slide's image (the embedding cache's image
    id; without one the cache falls back to path, size and modification time)."""
    for role in IMAGE_ROLES:
        f = entry.files.get(role)
        if f is not None and f.sha256:
            return f.sha256
    return None


def resolve_patch_size(cfg: "Config") -> None:
    """Set ``cfg.patch.size_um`` left at ``null`` to the encoder's own patch side (so that every output,
    and a resumed run's config comparison, records the number; see
    :func:`gnnst.data.encoders.default_patch_um`)."""
    from gnnst.data.encoders import default_patch_um

    if cfg.patch.size_um is None:
        cfg.patch.size_um = default_patch_um(cfg.encoder.name)
        log.info("patch.size_um = %g (encoder %s's own)", cfg.patch.size_um, cfg.encoder.name)


def load_and_embed(cfg: "Config", *, progress: bool = True, use_cache: bool = True,
                   alongside: Callable[[dict], Any] | None = None,
                   graph_ks: Sequence[tuple[str, int | None]] | None = None) -> LoadedSlides:
    """Read and check every slide of ``cfg.data`` (nothing is written before this succeeds), then
    embed their patches (cached in ``<cache>/embeddings`` unless ``use_cache`` is false).

    On CUDA the encoder is built and warmed up in a thread while the slides are read (on CPU after
    them, in this thread; either way a slide's error is the one reported), and
    ``alongside(adatas)`` (slide id -> AnnData; e.g. choosing the gene panel) runs in a thread while the
    patches are embedded when the encoder leaves cores free (on CUDA, or fewer torch threads than
    cores), else after; its result is ``LoadedSlides.alongside``. Stage times therefore overlap.

    Under ``torchrun`` each rank embeds its share of the slides (:mod:`gnnst.data.sharding`) on its own
    device, then reads the others' from the cache: every rank returns every slide. ``cfg.patch.size_um``
    left at ``null`` is set to the encoder's own patch side first (:func:`resolve_patch_size`).

    ``graph_ks``: the ``(setting, k)`` of every graph to be built on the slides (default
    ``[(f"graph.k={cfg.graph.k}", cfg.graph.k)]``), checked against each slide's spot count once the
    slides are read, before any patch is encoded (:func:`gnnst.graph.edges.check_spot_counts`).
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch  # imported here, before the encoder thread imports timm
    from tqdm.auto import tqdm

    from gnnst.data.embeddings import Timer, cache_path, embed_slides, load_cached
    from gnnst.data.encoders import default_batch_size, default_num_workers, resolve_device, set_cpu_threads
    from gnnst.data.manifest import cache_root, load_manifest
    from gnnst.data.slides import read_slide
    from gnnst.graph.edges import check_spot_counts
    from gnnst.data.sharding import Shard, assign, barrier, process_group

    timer = Timer()
    resolve_patch_size(cfg)
    shard = Shard.from_env()
    manifest = load_manifest(cfg.data.manifest)
    entries = manifest.select(cfg.data.slides)
    cache_dir = cache_root(cfg.data.cache_dir) / "embeddings" if use_cache else None
    if shard.world > 1 and cache_dir is None:
        raise GnnstError("under torchrun the ranks pass embeddings through the cache: drop --no-cache")
    set_cpu_threads(cfg.encoder.num_threads)
    device = resolve_device(cfg.encoder.device)
    if shard.world > 1 and device.type == "cuda" and device.index is None:  # ranks may share a GPU
        device = resolve_device(f"cuda:{shard.local_rank % torch.cuda.device_count()}")
    batch_size = cfg.encoder.batch_size or default_batch_size(device)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # on CUDA the encoder is built and warmed up while the slides are read (the device set-up
        # releases the GIL); on CPU both are Python-bound and contend for the GIL (read 5.6 s and
        # model load 5.9 s side by side on 2 cores, 2.9 s and 2.3 s one after the other), so it is
        # built after them, in this thread: a slide's error then comes before any model is loaded
        loading = pool.submit(_load_encoder, cfg, device, batch_size) if device.type == "cuda" else None
        adatas = {}
        try:
            for e in tqdm(entries, desc="read slides", unit="slide", disable=not progress, leave=False):
                with timer("read"):
                    adatas[e.slide_id] = read_slide(manifest, e, data_root=cfg.data.data_root,
                                                    cache_dir=cfg.data.cache_dir, download=cfg.data.download,
                                                    patch_size_um=cfg.patch.size_um)
            check_spot_counts({f"slide '{s}'": a.n_obs for s, a in adatas.items()},
                              [(f"graph.k={cfg.graph.k}", cfg.graph.k)] if graph_ks is None else graph_ks)
        except BaseException:  # the slide's error is the one to report
            if loading is not None:
                loading.exception()  # waits for the encoder thread; its own error, if any, comes second
            raise
        if loading is not None:
            with timer("model_wait"):
                encoder, seconds = loading.result()  # nothing is written before both succeed
        else:
            encoder, seconds = _load_encoder(cfg, device, batch_size)
        timer.totals["model_load"] += seconds
        workers = cfg.encoder.num_workers if cfg.encoder.num_workers is not None else default_num_workers(device)
        slides = [adatas[e.slide_id] for e in entries]
        image_ids = [image_checksum(e) for e in entries]
        owner = assign([a.n_obs for a in slides], shard.world)
        mine = [i for i in range(len(entries)) if owner[i] == shard.rank]
        log.info("embedding %d slide(s) with %s on %s (%s, batch %d, %d worker(s))%s", len(mine), encoder.name,
                 device, encoder.precision, batch_size, workers,
                 f", rank {shard.rank} of {shard.world}" if shard.world > 1 else "")
        # alongside the encoder only where it leaves cores free: on a CPU whose every core runs the
        # encoder's threads, preempting them cost more encode time than the overlap saved (2-core CPU)
        overlap = alongside is not None and (device.type == "cuda" or _cores() > torch.get_num_threads())
        side = pool.submit(alongside, dict(adatas)) if overlap else None
        with process_group(shard):
            done = embed_slides([slides[i] for i in mine], encoder, size_um=cfg.patch.size_um, batch_size=batch_size,
                                num_workers=workers, pad_value=cfg.patch.pad_value, device=device, cache_dir=cache_dir,
                                image_ids=[image_ids[i] for i in mine], timer=timer, progress=progress)
            embs = {entries[i].slide_id: emb for i, emb in zip(mine, done)}
            if shard.world > 1:
                with timer("barrier"):
                    barrier(shard)  # every shard is cached
                for i, e in enumerate(entries):
                    if owner[i] == shard.rank:
                        continue
                    path = cache_path(slides[i], encoder, size_um=cfg.patch.size_um, cache_dir=cache_dir,
                                      image_id=image_ids[i])
                    embs[e.slide_id] = load_cached(path, slides[i].n_obs, encoder.dim)
                    if embs[e.slide_id] is None:
                        raise GnnstError(f"slide '{e.slide_id}': rank {owner[i]}'s embeddings are not at {path}; "
                                         "data.cache_dir must be one folder every rank sees")
        with timer("alongside_wait"):
            extra = side.result() if side is not None else alongside(dict(adatas)) if alongside is not None else None
    embs = {e.slide_id: embs[e.slide_id] for e in entries}
    return LoadedSlides(manifest=manifest, entries=entries, adatas=adatas, embs=embs, encoder=encoder.record(),
                        timer=timer, alongside=extra)


def make_graphs(source: SlideSource, cfg: "Config", panel: "GenePanel", slide_ids: Sequence[str] | None = None,
                embs: dict | None = None, targets: "TargetFolder | None" = None) -> dict:
    """Slide id -> ``Data`` with ``y`` ``[N, G]`` = the normalised expression of ``panel`` (per spot, so no
    slide affects another), in the dtype of ``x`` (``graph.storage``), for ``slide_ids`` (default: every slide).

    ``embs``: slide id -> ``[N, D]`` embeddings to use as ``x`` instead of the source's (e.g. of
    stain-normalised patches, :func:`gnnst.graph.features.fold_features`; read one slide at a time), stored
    in the dtype of the source's ``x``.
    ``targets``: hold each ``y``, and each ``x`` taken from ``embs``, file-backed there
    (:class:`gnnst.graph.targets.TargetFolder`; the same values), so that only one slide's arrays are in
    memory at a time; ``None``: in memory.
    """
    import torch

    from gnnst.data.expression import panel_expression

    graphs = {}
    for s in source.slide_ids:
        if slide_ids is not None and s not in slide_ids:
            continue
        with source.timer("panel"):
            y = panel_expression(source.slide_counts(s), panel, cfg.expression, file=f"slide '{s}'")
        with source.timer("graph"):
            data = source.slide_graph(s, cfg.graph)
        np_dt = np.float16 if data.x.dtype == torch.float16 else np.float32
        if embs is not None and s in embs:  # file-backed with the targets: a cohort's x is not held in memory
            x = np.ascontiguousarray(embs[s], dtype=np_dt)
            data.x = torch.from_numpy(x) if targets is None else targets.hold(x)
        y = np.ascontiguousarray(y, dtype=np_dt)
        data.y = torch.from_numpy(y) if targets is None else targets.hold(y)
        graphs[s] = data
    return graphs


def write_graphs(out: Path, loaded: LoadedSlides, cfg: "Config", panel: "GenePanel") -> dict:
    """Write ``<slide>.pt`` (with the raw counts of the candidate genes), ``dataset.json`` and
    ``config.yaml`` into ``out`` (each atomically); see :mod:`gnnst.graph.store`."""
    from gnnst.config import dump_config
    from gnnst.data.expression import SlideCounts, candidate_genes
    from gnnst.graph.store import _source_record, counts_to_data, dataset_info
    from gnnst.io import atomic_torch_save, atomic_write_json

    with loaded.timer("panel"):
        candidates = candidate_genes([loaded.slide_counts(s) for s in loaded.slide_ids],
                                     cfg.expression.candidate_fraction)
    graphs = make_graphs(loaded, cfg, panel)
    slides_info = {}
    for e in loaded.entries:
        s, data = e.slide_id, graphs[e.slide_id]
        spots = loaded.spots(s)
        data.barcodes, data.mpp = spots.barcodes, spots.mpp
        data[COUNTS] = counts_to_data(SlideCounts.from_anndata(loaded.adatas[s], candidates))
        with loaded.timer("write"):
            atomic_torch_save(data, out / f"{s}.pt")
        with loaded.timer("checksums"):
            sources = _source_record(loaded.manifest, e, cfg)
        slides_info[s] = {"nodes": int(data.num_nodes), "edges": int(data.edge_index.shape[1]),
                          "patient_id": data.patient_id, "mpp": spots.mpp, "image_path": spots.image_path,
                          "image_scalef": spots.image_scalef, "candidate_counts": int(data[COUNTS]["data"].numel()),
                          "file": f"{s}.pt", "sources": sources}
        log.info("slide %s: %d nodes, %d edges", s, data.num_nodes, data.edge_index.shape[1])
    info = dataset_info(loaded, cfg, panel, slides_info, len(candidates))
    atomic_write_json(out / DATASET_JSON, info)
    dump_config(cfg, out / "config.yaml")
    return info


def build_graphs(
    cfg: "Config",
    out: str | Path,
    *,
    panel_slides: Sequence[str] | None = None,
    panel: "GenePanel | None" = None,
    progress: bool = True,
    use_cache: bool = True,
    overwrite: bool = False,
) -> BuildResult:
    """Manifest -> cached embeddings -> one graph per slide in ``out``.

    Args:
        cfg: resolved config (``data``, ``patch``, ``encoder``, ``expression``, ``graph``).
        out: output folder.
        panel_slides: slides the gene panel is chosen on (default: every slide built). Cross-validation
            chooses it on the training slides, so held-out slides never influence it.
        panel: use this panel instead of choosing one.
        use_cache: read and write the embedding cache (``False`` for cold-build benchmarks).
        overwrite: replace the graphs already in ``out`` (without it a folder holding graphs is refused,
            before any work: :class:`gnnst.outputs.RunFolder`).

    Under ``torchrun --nproc_per_node N`` (one machine or several) the ranks share the slides out and
    rank 0 writes ``out`` once every rank's slides are embedded; the other ranks return ``info=None``.
    """
    from gnnst.data.expression import SlideCounts, select_panel
    from gnnst.data.manifest import load_manifest
    from gnnst.data.sharding import Shard
    from gnnst.outputs import GRAPHS, RunFolder

    t_start = time.perf_counter()
    shard = Shard.from_env()
    resolve_patch_size(cfg)
    folder = RunFolder(out, GRAPHS, cfg, overwrite=overwrite)  # checks only: before any work
    ids = [e.slide_id for e in load_manifest(cfg.data.manifest).select(cfg.data.slides)]
    unknown = [s for s in (panel_slides or []) if s not in ids]
    if unknown:
        raise GnnstError(f"panel slide '{unknown[0]}' is not among the slides built ({', '.join(ids)})")

    def choose(adatas: dict) -> tuple:  # runs while the patches are embedded
        t0 = time.perf_counter()
        chosen = panel or select_panel([SlideCounts.from_anndata(adatas[s]) for s in (panel_slides or ids)],
                                       cfg.expression)
        return chosen, time.perf_counter() - t0

    loaded = load_and_embed(cfg, progress=progress and shard.is_main, use_cache=use_cache,
                            alongside=choose if shard.is_main else None)
    if not shard.is_main:  # rank 0 writes the dataset once every shard is embedded
        loaded.timer.totals["total"] = time.perf_counter() - t_start
        return BuildResult(info=None, timings=dict(loaded.timer.totals))
    panel, seconds = loaded.alongside
    loaded.timer.totals["panel"] += seconds
    folder.begin()
    info = write_graphs(Path(out), loaded, cfg, panel)
    timer = loaded.timer
    timer.totals["total"] = time.perf_counter() - t_start
    log.info("built %d graphs (%d nodes) in %.1f s: %s", len(info["slides"]), info["total_nodes"], timer.totals["total"],
             {k: round(v, 2) for k, v in timer.totals.items()})
    return BuildResult(info=info, timings=dict(timer.totals))


def ensure_dataset(cfg: "Config", *, progress: bool = True) -> GraphDataset:
    """The graph folder of ``cfg``'s slides in the cache (``<cache>/graphs/<manifest>-<fingerprint>``):
    reused when one was built with the same :func:`fingerprint` and its unchecksummed source files are
    unchanged, else built there first (:func:`gnnst.graph.dataset.build_graphs`, into a temporary folder
    renamed when complete). Under torchrun every rank takes part in the build (each embeds its share)
    and all return the same folder."""
    from gnnst.data.manifest import cache_root
    from gnnst.data.sharding import Shard, barrier, process_group
    from gnnst.data.manifest import load_manifest
    from gnnst.graph.store import fingerprint

    resolve_patch_size(cfg)

    fp = fingerprint(cfg)
    root = cache_root(cfg.data.cache_dir) / "graphs" / f"{load_manifest(cfg.data.manifest).name}-{fp[:16]}"
    if (root / DATASET_JSON).is_file():
        try:
            ds = GraphDataset(root)
            changed = ds.sources_changed(cfg) if ds.info.get("fingerprint") == fp else "another fingerprint"
        except GnnstError as e:
            changed = str(e)
        if changed is None:
            log.info("graphs: reusing %s (built from the same slides and settings)", root)
            return ds
        log.info("graphs: rebuilding %s (%s)", root, changed)
    shard = Shard.from_env()
    with process_group(shard):
        token = _launch_token(shard)
        tmp = root.parent / f".{root.name}.{token}.tmp"
        try:
            build_graphs(cfg, tmp, progress=progress)
            if shard.is_main:
                old = root.parent / f".{root.name}.{token}.old"
                if root.exists():
                    os.replace(root, old)
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if shard.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(shard)
    log.info("graphs: built %s", root)
    return GraphDataset(root)


def _launch_token(shard) -> str:
    """A name every rank of this launch shares and no other launch uses (rank 0's pid, broadcast)."""
    token = [f"{os.getpid()}"]
    if shard.world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(token, src=0)
    return token[0]
