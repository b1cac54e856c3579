"""The on-disk graph dataset: manifest -> one PyG ``Data`` per slide, and loading it back.

``build_graphs`` writes into ``out``:

- ``<slide_id>.pt``: a ``torch_geometric.data.Data`` (see :mod:`gnnst.keys` for its attributes),
  loadable with ``torch.load(path, weights_only=False)``;
- ``dataset.json``: gene panel, encoder, embedding width, graph parameters, node count per slide,
  package version;
- ``config.yaml``: the resolved config; ``build.log``: the log.

Embeddings are cached apart from graphs (``<cache>/embeddings``), so a rebuild that changes only
``graph.k`` or ``graph.radius_um`` re-encodes nothing. Under ``torchrun`` the slides are shared out over
the ranks (:mod:`gnnst.data.sharding`) and rank 0 writes the folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from gnnst import __version__, keys
from gnnst.errors import GnnstError

if TYPE_CHECKING:
    from anndata import AnnData
    from torch_geometric.data import Data

    from gnnst.config import Config
    from gnnst.data.expression import GenePanel

log = logging.getLogger("gnnst")

DATASET_JSON = "dataset.json"


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
    data.pixel = torch.from_numpy(pixel.astype(np.float32))
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
class LoadedSlides:
    """Slides read and embedded once, from which graphs for any gene panel are made cheaply."""

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


IMAGE_ROLES = ("image", "zarr", "outs")  # manifest roles whose checksum covers a slide's image (a file or a folder)


def _image_checksum(entry) -> str | None:
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

    The encoder is built (and on CUDA warmed up) in a thread while the slides are read, and
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
    from gnnst.data.readers import read_slide
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
    if shard.world > 1 and device.type == "cuda" and device.index is None:
        device = resolve_device(f"cuda:{shard.local_rank}")
    batch_size = cfg.encoder.batch_size or default_batch_size(device)
    with ThreadPoolExecutor(max_workers=1) as pool:
        loading = pool.submit(_load_encoder, cfg, device, batch_size)
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
            loading.exception()  # waits for the encoder thread; its own error, if any, comes second
            raise
        with timer("model_wait"):
            encoder, seconds = loading.result()  # nothing is written before both succeed
        timer.totals["model_load"] += seconds
        workers = cfg.encoder.num_workers if cfg.encoder.num_workers is not None else default_num_workers(device)
        slides = [adatas[e.slide_id] for e in entries]
        image_ids = [_image_checksum(e) for e in entries]
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


def panel_targets(adatas: dict, cfg: "Config", panel: "GenePanel") -> dict:
    """Slide id -> normalised expression ``[N, G]`` of ``panel`` (per spot, so no slide affects another)."""
    from gnnst.data.expression import panel_expression

    return {s: panel_expression(a, panel, cfg.expression, file=f"slide '{s}'") for s, a in adatas.items()}


def make_graphs(loaded: LoadedSlides, cfg: "Config", panel: "GenePanel", slide_ids: Sequence[str] | None = None,
                ys: dict | None = None, embs: dict | None = None) -> dict:
    """Slide id -> ``Data`` for ``panel`` (expression normalised per spot, so no slide affects another).

    ``ys``: slide id -> ``[N, G]`` targets already computed for ``panel`` (:func:`panel_targets`).
    ``embs``: slide id -> ``[N, D]`` embeddings to use instead of ``loaded.embs`` (e.g. of stain-normalised
    patches, :func:`gnnst.graph.features.fold_features`).
    """
    graphs = {}
    for e in loaded.entries:
        s = e.slide_id
        if slide_ids is not None and s not in slide_ids:
            continue
        if ys is not None and s in ys:
            y = ys[s]
        else:
            with loaded.timer("panel"):
                y = panel_targets({s: loaded.adatas[s]}, cfg, panel)[s]
        with loaded.timer("graph"):
            data = slide_to_data(loaded.adatas[s], (embs or loaded.embs)[s], y, k=cfg.graph.k, radius_um=cfg.graph.radius_um,
                                 storage=cfg.graph.storage)
            data.patient_id = e.patient_id or s
        graphs[s] = data
    return graphs


def write_graphs(out: Path, graphs: dict, loaded: LoadedSlides, cfg: "Config", panel: "GenePanel") -> dict:
    """Write ``<slide>.pt``, ``dataset.json`` and ``config.yaml`` into ``out`` (each atomically)."""
    from gnnst.config import dump_config
    from gnnst.io import atomic_torch_save, atomic_write_json

    slides_info = {}
    for s, data in graphs.items():
        with loaded.timer("write"):
            atomic_torch_save(data, out / f"{s}.pt")
        slides_info[s] = {"nodes": int(data.num_nodes), "edges": int(data.edge_index.shape[1]),
                          "patient_id": data.patient_id, "mpp": loaded.adatas[s].uns[keys.UNS_GNNST][keys.MPP],
                          "file": f"{s}.pt"}
        log.info("slide %s: %d nodes, %d edges", s, data.num_nodes, data.edge_index.shape[1])
    info = {
        "gnnst_version": __version__,
        "dataset": loaded.manifest.name,
        "manifest": str(loaded.manifest.path),
        "encoder": {k: loaded.encoder.get(k) for k in ("name", "identity", "input_size", "precision", "checkpoint",
                                                        "timm_kwargs")},
        "embedding_dim": int(loaded.encoder["dim"]),
        "patch_size_um": cfg.patch.size_um,
        "graph": {"k": cfg.graph.k, "radius_um": cfg.graph.radius_um},
        "expression": {"target_sum": cfg.expression.target_sum, "log1p": cfg.expression.log1p},
        "panel": panel.to_dict(),
        "num_genes": len(panel.genes),
        "slides": slides_info,
        "total_nodes": int(sum(v["nodes"] for v in slides_info.values())),
    }
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
    from gnnst.data.expression import select_panel
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
        chosen = panel or select_panel([adatas[s] for s in (panel_slides or ids)], cfg.expression)
        ys = panel_targets(adatas, cfg, chosen) if shard.is_main else None
        return chosen, ys, time.perf_counter() - t0

    loaded = load_and_embed(cfg, progress=progress and shard.is_main, use_cache=use_cache,
                            alongside=choose if shard.is_main else None)
    if not shard.is_main:  # rank 0 writes the dataset once every shard is embedded
        loaded.timer.totals["total"] = time.perf_counter() - t_start
        return BuildResult(info=None, timings=dict(loaded.timer.totals))
    panel, ys, seconds = loaded.alongside
    loaded.timer.totals["panel"] += seconds
    graphs = make_graphs(loaded, cfg, panel, ys=ys)
    folder.begin()
    info = write_graphs(Path(out), graphs, loaded, cfg, panel)
    timer = loaded.timer
    timer.totals["total"] = time.perf_counter() - t_start
    log.info("built %d graphs (%d nodes) in %.1f s: %s", len(graphs), info["total_nodes"], timer.totals["total"],
             {k: round(v, 2) for k, v in timer.totals.items()})
    return BuildResult(info=info, timings=dict(timer.totals))


class GraphDataset:
    """The graphs of a ``build_graphs`` output folder.

    Args:
        root: the folder holding ``dataset.json`` and ``<slide_id>.pt``.

    ``ds[slide_id]`` is that slide's ``Data``; ``ds.slide_ids``, ``ds.panel``, ``ds.info``.
    """

    def __init__(self, root: str | Path):
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
        self.panel = GenePanel.from_dict(self.info["panel"])
        self._cache: dict[str, "Data"] = {}

    @property
    def slide_ids(self) -> list[str]:
        return list(self.info["slides"])

    def __len__(self) -> int:
        return len(self.info["slides"])

    def __getitem__(self, slide_id: str) -> "Data":
        import torch

        if slide_id not in self.info["slides"]:
            raise GnnstError(f"{self.root}: no slide '{slide_id}' (slides: {', '.join(self.slide_ids)})")
        if slide_id not in self._cache:
            path = self.root / self.info["slides"][slide_id]["file"]
            try:
                self._cache[slide_id] = torch.load(path, weights_only=False)
            except Exception as e:
                raise GnnstError(f"{path}: cannot load graph ({type(e).__name__}: {e})") from None
        return self._cache[slide_id]

    def __repr__(self) -> str:
        return (f"GraphDataset('{self.root}', slides={len(self)}, nodes={self.info['total_nodes']}, "
                f"genes={self.info['num_genes']}, dim={self.info['embedding_dim']})")
