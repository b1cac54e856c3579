"""Micro-benchmark: what file-backed fold targets (:class:`gnnst.graph.targets.TargetFolder`) cost a training step.

    python benchmarks/targets.py [--slides 20] [--spots 2000] [--repeats 5] [--no-write]

Synthetic slides (a 100 µm grid, k=6 graph, ``x`` float32 ``[N, 1280]``, ``y`` float32 ``[N, 492]``, as
her2st-sized slides are held by default) with ``y`` once in memory and once file-backed (the same values),
then, interleaved, every batch of a shuffled epoch of the host sampler
(:meth:`gnnst.graph.sampler.SubgraphLoader.make_batch`, 512 centres, 2-hop halo) cut from each; reports
the median over ``repeats`` of the epoch's batch-cutting time per batch, and of the ``y`` gather alone.
Also the one-off per-fold costs: writing the targets (:meth:`TargetFolder.hold`) and the scaler fit
without concatenation (:meth:`gnnst.predictor.TargetScaler.fit_parts`) against ``fit`` on the
concatenation. The page cache is warm (the files were just written), as in training after the first touch.

Prints its table and writes the section ``targets`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the gnnst of this checkout, not an installed one

EMB_DIM, NUM_GENES, K = 1280, 492, 6


def make_slides(slides: int, spots: int, seed: int = 0) -> list:
    """``slides`` graphs of ``spots`` spots with float32 ``x`` and ``y`` in memory."""
    import numpy as np
    import torch
    from torch_geometric.data import Data

    from gnnst.graph.edges import graph_from_pos

    side = int(np.ceil(np.sqrt(spots)))
    pos = (np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:spots] * 100.0)
    sg = graph_from_pos(pos.astype(np.float64), k=K, radius_um=None)
    gen = torch.Generator().manual_seed(seed)
    return [Data(x=torch.randn(spots, EMB_DIM, generator=gen), y=torch.randn(spots, NUM_GENES, generator=gen),
                 pos=torch.from_numpy(pos.astype(np.float32)), edge_index=torch.from_numpy(sg.edge_index),
                 edge_attr=torch.from_numpy(sg.edge_attr), num_nodes=spots) for _ in range(slides)]


def run(slides: int, spots: int, repeats: int) -> dict:
    import copy

    import numpy as np
    import torch

    from gnnst.graph.sampler import SubgraphLoader
    from gnnst.graph.targets import TargetFolder
    from gnnst.predictor import TargetScaler

    torch.set_num_threads(1)
    mem = make_slides(slides, spots)
    r = {"slides": slides, "spots": spots, "genes": NUM_GENES}
    with TargetFolder() as tf:
        t0 = time.perf_counter()
        held = [tf.hold(g.y.numpy()) for g in mem]
        r["hold_seconds"], r["hold_mb"] = time.perf_counter() - t0, tf.bytes / 2**20
    files = []
    for g, y in zip(mem, held):
        d = copy.copy(g)
        d.y = y
        files.append(d)
    assert all(torch.equal(a.y, b.y) for a, b in zip(mem, files))
    loaders = {k: SubgraphLoader(gs, batch_nodes=512, num_hops=2, shuffle=True, seed=0)
               for k, gs in (("memory", mem), ("file", files))}
    groups = loaders["memory"].batches_of_parts()
    per = {"memory": [], "file": []}
    gather = {"memory": [], "file": []}
    for _ in range(repeats):
        for k, loader in loaders.items():  # interleaved: drift on a shared machine hits both alike
            t0 = time.perf_counter()
            for grp in groups:
                loader.make_batch(grp)
            per[k].append((time.perf_counter() - t0) / len(groups))
            gs = loader.slides
            t0 = time.perf_counter()
            for grp in groups:
                for si, centre in grp:  # the rows a batch takes: centres and (about 2x) their halo
                    gs[si].data.y[torch.from_numpy(np.concatenate([centre, centre]))].float()
            gather[k].append((time.perf_counter() - t0) / len(groups))
    r["batches"] = len(groups)
    for k in per:
        r[f"batch_ms_{k}"] = 1e3 * statistics.median(per[k])
        r[f"gather_ms_{k}"] = 1e3 * statistics.median(gather[k])
    ys = [g.y.numpy() for g in mem]
    t0 = time.perf_counter()
    a = TargetScaler.fit(np.concatenate(ys))
    r["fit_concat_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = TargetScaler.fit_parts(lambda: ys)
    r["fit_parts_seconds"] = time.perf_counter() - t0
    r["fit_equal"] = bool(np.array_equal(a.mean, b.mean) and np.array_equal(a.std, b.std))
    return r


def format_result(r: dict) -> str:
    n = r["slides"] * r["spots"]
    return "\n".join([
        "| y held | batch cut, median (ms/batch) | y rows gathered (ms/batch) |",
        "|---|---|---|",
        f"| in memory | {r['batch_ms_memory']:.2f} | {r['gather_ms_memory']:.3f} |",
        f"| file-backed (TargetFolder) | {r['batch_ms_file']:.2f} | {r['gather_ms_file']:.3f} |",
        "",
        f"- {r['slides']} slides x {r['spots']:,} spots ({n:,} spots), {r['genes']} genes, float32; {r['batches']} "
        "batches of 512 centres (2-hop halo) per epoch, host sampler, 1 torch thread; medians over the repeats.",
        f"- Per fold, once: writing the targets {r['hold_seconds']:.2f} s for {r['hold_mb']:.0f} MB "
        f"({r['hold_mb'] / max(r['hold_seconds'], 1e-9):.0f} MB/s, page cache); the scaler fitted without "
        f"concatenating {r['fit_parts_seconds']:.2f} s vs {r['fit_concat_seconds']:.2f} s on the concatenation, "
        f"equal bit for bit: {r['fit_equal']}.",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=20)
    p.add_argument("--spots", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = p.parse_args(argv)
    from _results import publish

    load = os.getloadavg()
    r = run(args.slides, args.spots, args.repeats)
    text = format_result(r) + f"\n- Load average (1/5/15 min) before {', '.join(f'{v:.1f}' for v in load)}."
    publish("targets", "File-backed fold targets: cost per step (`benchmarks/targets.py`)", text, r,
            write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
