"""Benchmark: training at Visium HD and HEST-1k scale on synthetic data, on a CPU or a GPU.

    python benchmarks/scale.py --device cpu|cuda [--sizes 10000 100000 1000000] [--cohort 1000 2000]
                               [--samplers host device] [--no-write]

Per size and sampler, in a fresh child process: a square grid of spots at an 8 µm pitch (Visium HD's
8 µm bins), random patch embeddings of the default encoder's width (1280) and random expression of a
her2st-sized panel (492 genes), stored as ``graph.storage: auto`` stores them (float16 above 200,000
spots); graph construction (:func:`gnnst.graph.edges.graph_from_pos`, k=6), then training epochs of
the default GNNST model through the library's own sampler and step (:func:`gnnst.train.trainer.make_loader`
with ``train.sampler`` = host or device, :func:`gnnst.train.trainer.train_epoch`). ``--cohort SLIDES
SPOTS`` adds a cohort of many small slides written as graph files and read back memory-mapped, as a
graph folder is read (HEST-1k-shaped: 1000 x 2000). Reports epoch time, spots per second, the ratio to
the host sampler in the same command, host peak memory (the child's ``/proc/self/status`` and
``ru_maxrss``), and on CUDA the GPU's peak allocated memory and utilisation (with pynvml).

Prints its table and writes the section ``scale-<device>`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the gnnst of this checkout, not an installed one

PITCH_UM = 8.0  # Visium HD 8 µm bins
EMB_DIM = 1280  # width of the default encoder (efficientnet_lite0)
NUM_GENES = 492  # panel size of her2st-6 with the default expression config
K = 6  # graph.k default
MEMORY_TARGET_MB = 6000  # peak RSS target at 1M spots


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(n: int, dtype: str, graph_repeats: int, epochs: int, max_step_batches: int, threads: int | None,
          device: str = "cpu", sampler: str = "host", seed: int = 0) -> dict:
    import numpy as np
    import torch
    from torch_geometric.data import Data

    from gnnst.graph.edges import graph_from_pos

    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    r = {"n": n, "dtype": dtype, "threads": torch.get_num_threads()}
    r["rss_start_mb"] = _status_mb("VmRSS")
    side = int(np.ceil(np.sqrt(n)))
    pos = (np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * PITCH_UM).astype(np.float64)

    # --- graph construction (repeated; the last result is kept)
    times, cpu = [], []
    _reset_peak()
    base = _status_mb("VmRSS")
    for _ in range(graph_repeats):
        ei = ea = sg = None
        t0, c0 = time.perf_counter(), time.process_time()
        sg = graph_from_pos(pos, k=K, radius_um=None)  # the library's graph builder (spatial_edges + edge_features)
        ei, ea = sg.edge_index, sg.edge_attr
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    r["graph_seconds"] = times
    r["graph_cpu_seconds_median"] = statistics.median(cpu)  # CPU time: robust to other jobs on the machine
    r["graph_seconds_median"] = statistics.median(times)
    r["graph_peak_above_start_mb"] = _status_mb("VmHWM") - base
    r["edges"] = int(ei.shape[1])

    # --- the slide's arrays: embeddings, expression, edges
    from gnnst.graph.dataset import storage_dtype

    tdt = storage_dtype(n, dtype)  # dtype = the graph.storage setting: auto, float32 or float16
    r["storage"], r["dtype"] = dtype, str(tdt).replace("torch.", "")
    x = torch.empty(n, EMB_DIM, dtype=tdt)
    y = torch.empty(n, NUM_GENES, dtype=tdt)
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, n, 65536):  # fill in chunks: no float32 copy of a float16 matrix
        e = min(s + 65536, n)
        x[s:e] = torch.randn(e - s, EMB_DIM, generator=gen).to(tdt)
        y[s:e] = torch.randn(e - s, NUM_GENES, generator=gen).to(tdt)
    data = Data(x=x, y=y, pos=torch.from_numpy(pos.astype(np.float32)), edge_index=torch.from_numpy(ei),
                edge_attr=torch.from_numpy(ea), num_nodes=n)
    r["slide_arrays_mb"] = sum(t.numel() * t.element_size() for t in (x, y, data.pos, data.edge_index, data.edge_attr)) / 2**20
    r["rss_with_slide_mb"] = _status_mb("VmRSS")

    # --- one training epoch of the default model: the library's sampler and step (gnnst.train.trainer)
    r.update(train_epochs([data], device=device, sampler=sampler, epochs=epochs, max_step_batches=max_step_batches,
                          seed=seed))
    return r


def _rss_anon_mb() -> float:
    return _status_mb("RssAnon")


class _AnonPeak:
    """The peak of this process's anonymous resident memory (``RssAnon``, file pages left out: mapped graph
    files and targets are page cache the kernel reclaims), sampled every 0.05 s in a thread."""

    def __init__(self):
        import threading

        self.peak = _rss_anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_anon_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_anon_mb())


class _GpuMonitor:
    """GPU utilisation sampled every 0.1 s in a thread (``torch.cuda.utilization``, needs pynvml); nothing
    off CUDA or without pynvml."""

    def __init__(self, device):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        if getattr(device, "type", "cpu") == "cuda":
            import torch

            try:
                torch.cuda.utilization(device)
            except Exception:  # noqa: BLE001 - no pynvml: not measured, said so in the table
                return
            self._thread = threading.Thread(target=self._run, args=(device,), daemon=True)
            self._thread.start()

    def _run(self, device):
        import torch

        while not self._stop.wait(0.1):
            self.samples.append(float(torch.cuda.utilization(device)))

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.samples:
            return {}
        return {"gpu_util_mean": statistics.mean(self.samples), "gpu_util_max": max(self.samples)}


def train_epochs(graphs, *, device: str, sampler: str, epochs: int, max_step_batches: int, seed: int = 0,
                 cfg=None, after=None, cut_rest: bool = False) -> dict:
    """``epochs`` epochs of the default GNNST model over ``graphs`` with ``train.sampler: sampler`` on
    ``device``, through :func:`gnnst.train.trainer.make_loader` and :func:`~gnnst.train.trainer.train_epoch`
    (what ``fit`` runs). An epoch longer than ``max_step_batches`` steps on its first batches only and is
    extrapolated (marked est.): the tiles (host) and, for the device sampler, the halo plan of the WHOLE
    epoch are timed in full, then the stepped batches' time is scaled to all batches. ``cfg``: the config
    (default: the defaults); ``after(model, cfg, device) -> dict``: run once the epochs are done, its
    figures added. ``cut_rest``: on the host sampler, the batches of an epoch beyond those stepped are cut
    too (sampled, not stepped), so that the sampler's memory over a whole epoch is measured (its per-slide
    index is built as batches need it)."""
    import torch

    from gnnst.config import Config
    from gnnst.models import create_model
    from gnnst.train.trainer import amp_dtype, default_batch_nodes, make_loader, make_optimizer, train_epoch

    dev = torch.device(device)
    cfg = cfg or Config()
    cfg.train.sampler = sampler
    cfg.train.batch_nodes = cfg.train.batch_nodes or default_batch_nodes(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    r: dict = {"device": str(dev), "sampler": sampler, "batch_nodes": cfg.train.batch_nodes}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _reset_peak()
    before = _status_mb("VmRSS")
    anon_peak = r["rss_anon_before_loader_mb"] = _rss_anon_mb()
    t0 = time.perf_counter()
    loader = make_loader(graphs, cfg, dev, num_hops=cfg.train.num_hops, shuffle=True, seed=seed)
    sync()
    r["loader_setup_seconds"] = time.perf_counter() - t0
    r["loader"] = type(loader).__name__
    torch.manual_seed(seed)
    model = create_model("gnnst", in_dim=int(graphs[0].x.shape[1]), num_genes=int(graphs[0].y.shape[1]),
                         cfg=cfg.model).to(dev)
    opt = make_optimizer(model, cfg.train)
    autocast = amp_dtype(dev) if cfg.train.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=autocast == torch.float16)
    model.train()
    log = []
    mon = _GpuMonitor(dev)
    for ep in range(epochs):
        loader.set_epoch(ep)
        t_start, c_start = time.perf_counter(), time.process_time()
        groups = loader.batches_of_parts()
        t_tiles = time.perf_counter() - t_start
        t_plan = 0.0
        if hasattr(loader, "plan") and len(groups) > max_step_batches:  # the whole epoch's halos, timed in full
            t0 = time.perf_counter()
            loader.plan(groups)
            sync()
            t_plan = time.perf_counter() - t0
        stepped_groups = groups[:max_step_batches]
        t0, c0 = time.perf_counter(), time.process_time()
        total, steps = train_epoch(model, model, loader, stepped_groups, opt, scaler, device=dev, autocast=autocast)
        loss = float(total) / max(steps, 1)  # the one read-back of the epoch (synchronises)
        t_steps, c_steps = time.perf_counter() - t0, time.process_time() - c0
        scale = len(groups) / max(steps, 1)
        centres = sum(len(c) for grp in groups for _, c in grp)
        seconds = t_tiles + t_plan + t_steps * scale
        log.append({"seconds": seconds, "measured_seconds": time.perf_counter() - t_start,
                    "cpu_seconds": (c0 - c_start) + c_steps * scale, "tiles_seconds": t_tiles, "plan_seconds": t_plan,
                    "step_seconds": t_steps * scale, "stepped_batches": steps, "batches": len(groups),
                    "centre_nodes": centres, "spots_per_second": centres / seconds, "loss": loss})
        anon_peak = max(anon_peak, _rss_anon_mb())
        rest = groups[steps:]
        if cut_rest and rest and hasattr(loader, "make_batch"):  # the rest of the epoch: sampled, not stepped
            peak = _AnonPeak()
            t0 = time.perf_counter()
            for grp in rest:
                loader.make_batch(grp)
            log[-1].update(cut_rest_batches=len(rest), cut_rest_seconds=time.perf_counter() - t0)
            anon_peak = max(anon_peak, peak.stop())
    if hasattr(loader, "index_nbytes"):  # the host sampler's per-slide index at the epoch's end
        r.update(index_held_mb=loader.index_nbytes / 2**20, slides=len(graphs))
    r.update(mon.stop())
    r["epochs"] = log
    r["epoch_seconds_median"] = statistics.median(e["seconds"] for e in log)
    r["spots_per_second_median"] = statistics.median(e["spots_per_second"] for e in log)
    r["epoch_peak_above_slide_mb"] = _status_mb("VmHWM") - before
    r["rss_anon_end_mb"] = anon_peak
    r["peak_rss_mb"] = _status_mb("VmHWM")
    if dev.type == "cuda":
        r["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if after is not None:  # after the epoch's figures: its memory is its own
        r.update(after(model, cfg, dev))
    return r


def write_cohort(root: Path, slides: int, spots: int, seed: int = 0) -> None:
    """A graph folder (:class:`gnnst.graph.store.GraphDataset`'s format) of ``slides`` synthetic slides of
    ``spots`` spots: ``x`` float16 (``graph.storage: float16``) random embeddings, a 100 µm grid with its k=6
    graph, and raw counts (Poisson, mean 0.3) of a ``NUM_GENES`` panel plus each spot's total; files already
    there are kept (a rerun reuses them)."""
    import numpy as np
    import scipy.sparse as sp
    import torch
    from torch_geometric.data import Data

    from gnnst.data.expression import SlideCounts
    from gnnst.graph.edges import graph_from_pos
    from gnnst.graph.store import COUNTS, DATASET_JSON, FORMAT, counts_to_data

    root.mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(spots)))
    pos = (np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:spots] * 100.0)  # Visium pitch
    sg = graph_from_pos(pos.astype(np.float64), k=K, radius_um=None)
    genes = [f"G{j}" for j in range(NUM_GENES)]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    info = {}
    for i in range(slides):
        sid, path = f"s{i}", root / f"s{i}.pt"
        info[sid] = {"file": path.name, "nodes": spots, "patient_id": sid, "mpp": 1.0}
        if path.is_file():
            continue
        m = sp.csr_matrix(rng.poisson(0.3, size=(spots, NUM_GENES)).astype(np.float32))
        counts = SlideCounts(slide_id=sid, genes=genes, counts=m,
                             totals=np.asarray(m.sum(1)).ravel().astype(np.float32) + 100.0)  # + genes off the panel
        d = Data(x=torch.randn(spots, EMB_DIM, generator=gen).half(), pos=torch.from_numpy(pos.astype(np.float32)),
                 pixel=torch.from_numpy(pos.astype(np.float64)), edge_index=torch.from_numpy(sg.edge_index),
                 edge_attr=torch.from_numpy(sg.edge_attr), num_nodes=spots)
        d.slide_id, d.patient_id, d.mpp = sid, sid, 1.0
        d[COUNTS] = counts_to_data(counts)
        torch.save(d, path)
    panel = {"genes": genes, "heg": genes, "hvg": genes, "source_slides": list(info)}
    (root / DATASET_JSON).write_text(json.dumps({
        "format": FORMAT, "panel": panel, "encoder": {"name": "synthetic"}, "embedding_dim": EMB_DIM,
        "graph": {"k": K, "radius_um": None, "storage": "float16"}, "candidate_fraction": 0.0,
        "num_genes": NUM_GENES, "slides": info, "total_nodes": slides * spots}))


def validation_pass(train, val, val_masks):
    """What ``fit`` runs after each epoch, once, timed and with its memory: the retrieval bank of the training
    spots (``after_fit``) and the prediction of the scored validation spots with its score (as
    :func:`gnnst.train.trainer.fit`: :func:`~gnnst.train.trainer.validation_loader`, ``predict_graphs`` at those
    spots only). Returns ``after`` for :func:`train_epochs`."""

    def after(model, cfg, dev) -> dict:
        import torch

        from gnnst.predictor import predict_graphs
        from gnnst.train.trainer import validation_loader, validation_score

        _reset_peak()
        anon0, hwm0 = _rss_anon_mb(), _status_mb("VmHWM")
        anon = _AnonPeak()
        t0 = time.perf_counter()
        model.eval()
        model.after_fit(train, batch_nodes=cfg.train.batch_nodes)
        t_bank = time.perf_counter() - t0
        val_y = [g.y[torch.from_numpy(m)].numpy() for g, m in zip(val, val_masks)]
        loader = validation_loader(model, val, val_masks, cfg, dev)
        (preds,) = predict_graphs(model, val, batch_nodes=cfg.train.batch_nodes, num_hops=cfg.train.num_hops,
                                  device=dev, loader=loader, masks=val_masks).values()
        score = validation_score(val_y, preds)
        anon_peak = anon.stop()
        return {"val_pass_anon_peak_above_mb": anon_peak - anon0, "val_pass_seconds": time.perf_counter() - t0,
                "bank_seconds": t_bank,
                "bank_spots": int(model.bank_z.shape[0]), "val_spots_scored": sum(int(m.sum()) for m in val_masks),
                "val_pass_peak_above_mb": _status_mb("VmHWM") - hwm0, "val_pass_anon_growth_mb": _rss_anon_mb() - anon0,
                "val_score": score, "caps": [cfg.model.retrieval_bank_spots, cfg.train.val_spots],
                "val_index_held_mb": getattr(loader, "index_nbytes", 0) / 2**20}

    return after


def panel_choice(root: Path, cfg) -> dict:
    """The fold's panel chosen on the whole cohort as :func:`gnnst.train.prepare.prepare_training` chooses it
    (:func:`gnnst.data.expression.select_panel` with one reading function per slide of the graph folder):
    seconds, peak anonymous memory above its start, genes chosen."""
    import functools

    from gnnst.data.expression import select_panel
    from gnnst.graph.store import GraphDataset

    ds = GraphDataset(root)
    anon0 = _rss_anon_mb()
    peak = _AnonPeak()
    t0 = time.perf_counter()
    panel = select_panel([functools.partial(ds.slide_counts, s) for s in ds.slide_ids], cfg.expression)
    return {"panel_seconds": time.perf_counter() - t0, "panel_anon_peak_above_mb": peak.stop() - anon0,
            "panel_genes": len(panel.genes), "panel_spots": cfg.expression.panel_spots}


def cohort_child(slides: int, spots: int, sampler: str, device: str, epochs: int, max_step_batches: int,
                 threads: int | None, folder: str, seed: int = 0, targets_in: str = "file",
                 caps: str = "on", cut_rest: bool = False) -> dict:
    """A HEST-1k-shaped cohort: ``slides`` synthetic slides of ``spots`` spots each, written as a graph folder
    (:func:`write_cohort`) and read back as training reads one: :class:`gnnst.graph.store.GraphDataset`
    (``x`` memory-mapped, float16), the fold's targets made by the library's own path
    (:func:`gnnst.graph.dataset.make_graphs` from the stored counts into a
    :class:`~gnnst.graph.targets.TargetFolder`, then :func:`gnnst.train.prepare.honest_targets`: validation
    blocks, scaler, standardised copy), then one epoch over the training parts. Before them, the panel is
    chosen on the whole cohort as a fold chooses it (:func:`panel_choice`); the feature normalisation of
    :func:`~gnnst.train.prepare.prepare_training` is not part of it.
    ``targets_in="memory"``: the same targets held in memory instead (``targets=None``), for comparison.
    After the epoch, one validation pass as ``fit`` runs it (:func:`validation_pass`); ``caps="off"``: with
    ``expression.panel_spots``, ``model.retrieval_bank_spots`` and ``train.val_spots`` null (every spot at
    once for the panel, every training spot in the bank, every validation spot scored), for comparison.
    ``cut_rest``: see :func:`train_epochs`."""
    import torch

    from gnnst.config import Config
    from gnnst.graph.dataset import make_graphs
    from gnnst.graph.store import GraphDataset
    from gnnst.graph.targets import TargetFolder
    from gnnst.train.prepare import honest_targets

    if threads:
        torch.set_num_threads(threads)
    root = Path(folder)
    t0 = time.perf_counter()
    write_cohort(root, slides, spots, seed)
    r = {"cohort_slides": slides, "n": slides * spots, "write_seconds": time.perf_counter() - t0,
         "threads": torch.get_num_threads(), "rss_start_mb": _status_mb("VmRSS"), "dtype": "float16 (mmap)",
         "storage": "float16"}
    cfg = Config()
    cfg.graph.storage = "float16"
    if caps == "off":
        cfg.model.retrieval_bank_spots, cfg.train.val_spots, cfg.expression.panel_spots = None, None, None
    r.update(panel_choice(root, cfg))
    _reset_peak()
    anon0 = _rss_anon_mb()
    t0 = time.perf_counter()
    ds = GraphDataset(root)
    with TargetFolder() as folder:
        targets = folder if targets_in == "file" else None
        graphs = make_graphs(ds, cfg, ds.panel, targets=targets)
        val_masks, _, train, val = honest_targets(list(graphs.values()), cfg, targets)
        r["targets_file_mb"] = folder.bytes / 2**20
        r["targets_in"] = targets_in
    r["targets_seconds"] = time.perf_counter() - t0
    r["targets_peak_rss_mb"] = _status_mb("VmHWM")
    r["targets_anon_growth_mb"] = _rss_anon_mb() - anon0
    r["targets_rss_anon_mb"], r["targets_rss_file_mb"] = _rss_anon_mb(), _status_mb("RssFile")
    r["rss_with_slide_mb"] = _status_mb("VmRSS")
    r["slide_arrays_mb"] = slides * spots * (EMB_DIM * 2 + 2 * NUM_GENES * 2) / 2**20  # x and both y, on disk
    r.update(train_epochs(train, device=device, sampler=sampler, epochs=epochs, max_step_batches=max_step_batches,
                          seed=seed, cfg=cfg, after=validation_pass(train, val, val_masks), cut_rest=cut_rest))
    return r


def run_child(args: list[str], label: str) -> dict:
    """One measurement in a fresh interpreter (``--child ...`` arguments); its whole-process peak RSS as the
    kernel accounted it."""
    cmd = [sys.executable, __file__, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child for {label} failed with status {proc.returncode}")
    r = json.loads(out.strip().splitlines()[-1])
    r["child_wall_seconds"] = time.perf_counter() - t0
    r["child_maxrss_mb"] = usage.ru_maxrss / 1024
    return r


def _storage(r: dict) -> str:
    setting = r.get("storage", r["dtype"])
    return f"{setting} ({r['dtype']})" if setting == "auto" else r["dtype"]


def _est(r: dict) -> str:
    part = r["epochs"][0]
    return "" if part["stepped_batches"] == part["batches"] else \
        f" (est.: {part['stepped_batches']} of {part['batches']} batches stepped)"


def format_table(results: list[dict]) -> str:
    """One row per (spots, storage, sampler); ``vs host`` = this epoch time / the host sampler's in the same run."""
    lines = ["| spots | storage | device | sampler | batch | epoch (s) | spots/s | vs host | tiles + plan (s) | "
             "steps (s) | epoch CPU µs/spot | slide arrays (MB) | epoch peak above slide (MB) | process peak RSS (MB) | "
             "GPU peak (MB) | GPU util mean/max (%) |",
             "|---" * 16 + "|"]
    host = {(r["n"], _storage(r), r.get("cohort_slides")): r["epoch_seconds_median"] for r in results
            if r["sampler"] == "host"}
    for r in results:
        med = lambda k: statistics.median(x[k] for x in r["epochs"])  # noqa: E731
        h = host.get((r["n"], _storage(r), r.get("cohort_slides")))
        ratio = f"{r['epoch_seconds_median'] / h:.2f}" if h else "-"
        spots = f"{r['n']:,}" if "cohort_slides" not in r else f"{r['cohort_slides']:,} x {r['n'] // r['cohort_slides']:,}"
        gpu = f"{r['gpu_peak_mb']:.0f}" if "gpu_peak_mb" in r else "-"
        util = f"{r['gpu_util_mean']:.0f}/{r['gpu_util_max']:.0f}" if "gpu_util_mean" in r else "-"
        lines.append(
            f"| {spots} | {_storage(r)} | {r['device']} | {r['sampler']} | {r['batch_nodes']} | "
            f"{r['epoch_seconds_median']:.2f}{_est(r)} | {r['spots_per_second_median']:,.0f} | {ratio} | "
            f"{med('tiles_seconds') + med('plan_seconds'):.2f} | {med('step_seconds'):.2f} | "
            f"{1e6 * med('cpu_seconds') / r['n']:.0f} | {r['slide_arrays_mb']:.0f} | "
            f"{r['epoch_peak_above_slide_mb']:.0f} | {r['child_maxrss_mb']:.0f} | {gpu} | {util} |")
    return "\n".join(lines)


def format_validation(results: list[dict]) -> str:
    """The cohort rows' validation pass (:func:`validation_pass`, what ``fit`` runs after each epoch): the
    caps, the bank's spots, the validation spots scored, its seconds, and the memory it added: the peak RSS
    (file pages included: the graph files' and targets' pages the pass touched, page cache), the peak of the
    anonymous memory, and the anonymous memory still held at its end (the bank, the loader's index)."""
    lines = ["| cohort | caps (panel, bank, validation spots) | panel chosen in (s) | panel: peak anonymous RSS above "
             "its start (MB) | bank spots | validation spots scored | pass (s) | "
             "of it the bank (s) | peak RSS above the pass's start (MB) | peak anonymous RSS above it (MB) | "
             "anonymous RSS added (MB) |", "|---" * 11 + "|"]
    for r in results:
        caps = ", ".join("null" if c is None else f"{c:,}" for c in [r["panel_spots"], *r["caps"]])
        cohort = f"{r['cohort_slides']:,} x {r['n'] // r['cohort_slides']:,}"
        lines.append(f"| {cohort} | {caps} | {r['panel_seconds']:.1f} | "
                     f"{r['panel_anon_peak_above_mb']:.0f} | {r['bank_spots']:,} | "
                     f"{r['val_spots_scored']:,} | {r['val_pass_seconds']:.1f} | {r['bank_seconds']:.1f} | "
                     f"{r['val_pass_peak_above_mb']:.0f} | {r['val_pass_anon_peak_above_mb']:.0f} | "
                     f"{r['val_pass_anon_growth_mb']:.0f} |")
    return "\n".join(lines)


def format_index(results: list[dict]) -> str:
    """The cohort rows' host-sampler index: the batches cut in the epoch (stepped, and cut without a step
    with ``--cut-rest``), what the training and validation samplers' per-slide indexes held at the end, and
    the anonymous memory of the epoch."""
    lines = ["| cohort | batches stepped + cut only | cutting the rest (s) | training sampler's index (MB) | "
             "validation sampler's (MB) | anonymous RSS before the loader (MB) | peak anonymous RSS of the epoch (MB) |",
             "|---" * 7 + "|"]
    for r in results:
        e = r["epochs"][-1]
        val = f"{r['val_index_held_mb']:.1f}" if "val_index_held_mb" in r else "-"
        lines.append(f"| {r['cohort_slides']:,} x {r['n'] // r['cohort_slides']:,} | "
                     f"{e['stepped_batches']:,} + {e.get('cut_rest_batches', 0):,} of {e['batches']:,} | "
                     f"{e.get('cut_rest_seconds', 0):.1f} | {r['index_held_mb']:.1f} | {val} | "
                     f"{r.get('rss_anon_before_loader_mb', float('nan')):.0f} | {r['rss_anon_end_mb']:.0f} |")
    return "\n".join(lines)


def format_targets(results: list[dict]) -> str:
    """The cohort rows' target figures: the fold's two ``y`` copies on disk, the seconds to make them, the
    anonymous memory they added and the process's peak RSS while they were made (file pages included), its
    anonymous and file-backed resident memory after (file pages: the graph files' counts and ``x``, the
    targets' files, reclaimable page cache), and the epoch's figures."""
    lines = ["| cohort | sampler | targets on disk (MB) | targets made in (s) | anonymous RSS added (MB) | "
             "peak RSS while made (MB) | RSS after: anonymous + file pages (MB) | epoch peak above that (MB) | "
             "anonymous RSS at the epoch's end (MB) | process peak RSS (MB) |", "|---" * 10 + "|"]
    for r in results:
        lines.append(f"| {r['cohort_slides']:,} x {r['n'] // r['cohort_slides']:,} ({r['targets_in']}) | {r['sampler']} | "
                     f"{r['targets_file_mb']:.0f} | {r['targets_seconds']:.1f} | {r['targets_anon_growth_mb']:.0f} | "
                     f"{r['targets_peak_rss_mb']:.0f} | {r['targets_rss_anon_mb']:.0f} + {r['targets_rss_file_mb']:.0f} | "
                     f"{r['epoch_peak_above_slide_mb']:.0f} | {r['rss_anon_end_mb']:.0f} | {r['child_maxrss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model trains")
    p.add_argument("--samplers", nargs="+", default=None, choices=["host", "device"],
                   help="train.sampler values to run, each in its own child (default: host and device)")
    p.add_argument("--sizes", nargs="*", type=int, default=[10_000, 100_000, 1_000_000],
                   help="single-slide sizes in spots (none: only the cohort)")
    p.add_argument("--cohort", nargs=2, type=int, default=None, metavar=("SLIDES", "SPOTS"),
                   help="also a cohort of SLIDES slides x SPOTS spots read memory-mapped from graph files "
                        "(HEST-1k-shaped: 1000 2000)")
    p.add_argument("--cohort-dir", default=None, help="where the cohort's graph files are written (default: a "
                                                      "temporary folder, removed afterwards)")
    p.add_argument("--cohort-targets", default="file", choices=["file", "memory"],
                   help="the cohort's fold targets file-backed (the library's way) or held in memory (for comparison)")
    p.add_argument("--cohort-caps", default="on", choices=["on", "off"],
                   help="the cohort's validation pass with the retrieval bank and the scored validation spots capped "
                        "(model.retrieval_bank_spots, train.val_spots: the defaults) or not (for comparison)")
    p.add_argument("--cut-rest", action="store_true",
                   help="cohort, host sampler: also cut (sample without a model step) the epoch's batches beyond "
                        "--max-step-batches, so the sampler's memory over a whole epoch is measured")
    p.add_argument("--graph-repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="epochs per size (default: 3 below 100k spots, else 1)")
    p.add_argument("--max-step-batches", type=int, default=400,
                   help="model steps per epoch at most; a longer epoch steps on its first batches and extrapolates "
                        "(marked est.; the tiles and the device sampler's whole-epoch plan are timed in full)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: all cores)")
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--note", default="", help="a remark recorded with the table")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-cohort", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sampler", default="host", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.dtype, args.graph_repeats, args.epochs or 1, args.max_step_batches,
                               args.threads, device=args.device, sampler=args.sampler)), flush=True)
        return 0
    if args.child_cohort is not None:
        print(json.dumps(cohort_child(*args.child_cohort, args.sampler, args.device, args.epochs or 1,
                                      args.max_step_batches, args.threads, args.cohort_dir,
                                      targets_in=args.cohort_targets, caps=args.cohort_caps, cut_rest=args.cut_rest)),
              flush=True)
        return 0

    import shutil
    import tempfile

    from _results import machine_info, write_section

    samplers = args.samplers or ["host", "device"]
    common = ["--device", args.device, "--max-step-batches", str(args.max_step_batches)] + (
        ["--threads", str(args.threads)] if args.threads else [])
    load_before = os.getloadavg()
    results = []
    for n in args.sizes:
        for sampler in samplers:
            epochs = args.epochs or (3 if n < 100_000 else 1)
            print(f"{n:,} spots, sampler {sampler}: ...", flush=True)
            results.append(run_child(["--child", str(n), "--sampler", sampler, "--graph-repeats",
                                      str(args.graph_repeats), "--epochs", str(epochs), *common], f"n={n} {sampler}"))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
    if args.cohort:
        folder = args.cohort_dir or tempfile.mkdtemp(prefix="gnnst_cohort_")
        try:
            for sampler in samplers:
                print(f"cohort {args.cohort[0]} x {args.cohort[1]}, sampler {sampler}: ...", flush=True)
                results.append(run_child(["--child-cohort", *map(str, args.cohort), "--sampler", sampler,
                                          "--cohort-dir", folder, "--epochs", "1", "--cohort-targets",
                                          args.cohort_targets, "--cohort-caps", args.cohort_caps,
                                          *(["--cut-rest"] if args.cut_rest else []), *common],
                                         f"cohort {sampler}"))
                print(format_table(results[-1:]).splitlines()[-1], flush=True)
        finally:
            if args.cohort_dir is None:
                shutil.rmtree(folder, ignore_errors=True)
    load_after = os.getloadavg()
    notes = [
        f"- Synthetic square grids ({PITCH_UM:g} µm pitch for single slides, 100 µm for cohort slides); embeddings "
        f"{EMB_DIM} wide, {NUM_GENES} genes; the default GNNST model, trained through the library's own "
        "`make_loader` + `train_epoch` (what `fit` runs: AdamW, gradient clipping, autocast on CUDA); 2-hop halo; "
        f"batch = `train.batch_nodes: null` resolved for the device; {results[0]['threads'] if results else '?'} "
        "torch thread(s) per child. Epoch time = median over the epochs run (3 below 100k spots, else 1); est. = the "
        "model stepped on the first batches of the shuffled epoch and the step time (sampling included) was scaled "
        "to all batches, while the tiles and the device sampler's whole-epoch halo plan were timed in full.",
        "- `vs host`: epoch time over that of `train.sampler: host` at the same size in the same command. "
        "`epoch peak above slide`: the epoch's peak RSS minus the RSS before the loader was made. Cohort rows: "
        "the slides are a graph folder read by `GraphDataset` (`x` float16, memory-mapped, paged in from disk); "
        "the fold's targets are made from the stored counts by the library's path (`make_graphs` into a "
        "`TargetFolder`, `honest_targets`): both `y` copies file-backed in `$TMPDIR`, paged like `x`.",
        f"- Load average (1/5/15 min) before {', '.join(f'{v:.1f}' for v in load_before)}, after "
        f"{', '.join(f'{v:.1f}' for v in load_after)}: the machine is shared, so wall times may be inflated.",
    ]
    if args.device == "cpu":
        notes.append("- CPU only: the device sampler here runs the CUDA code path on the CPU; GPU memory and "
                     "utilisation are not measured (no GPU in this session).")
    if args.note:
        notes.append(f"- Note: {args.note}")
    text = format_table(results) + "\n\n" + "\n".join(notes)
    if any("targets_file_mb" in r for r in results):
        text += "\n\n" + format_targets([r for r in results if "targets_file_mb" in r])
    if any("val_pass_seconds" in r for r in results):
        text += "\n\n" + format_validation([r for r in results if "val_pass_seconds" in r])
    if any("index_held_mb" in r and "cohort_slides" in r for r in results):
        text += "\n\n" + format_index([r for r in results if "index_held_mb" in r and "cohort_slides" in r])
    print(machine_info())
    print(text)
    if not args.no_write:
        key = f"scale-{args.device}"
        write_section(key, f"Scaling on {args.device.upper()} (`benchmarks/scale.py --device {args.device}`)", text)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"{key}.json").write_text(json.dumps(
            {"results": results, "loadavg_before": load_before, "loadavg_after": load_after}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
