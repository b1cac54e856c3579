"""Benchmark: building the her2st-6 graphs, cold (empty embedding cache) and warm, split into stages,
against the encoder's compute floor measured in the same run.

    python benchmarks/build_graphs.py [--repeats 3] [--data-root DIR] [--baseline REV] [--no-write]

Every build runs in a fresh child process (imports and model loading included, as a user's command
would pay them); the table gives medians over ``--repeats`` runs and writes its section of
``benchmarks/RESULTS.md``. The compute floor is the encoder's FLOPs for all patches divided by the
float32 matrix-multiply rate of this machine, measured here with the same thread count.

``--baseline REV`` also times cold builds of the code at git revision ``REV`` (checked out into a
temporary worktree, run as ``python -m gnnst build-graphs`` with that tree first on ``PYTHONPATH``),
interleaved with this checkout's cold builds (alternating which goes first) so both see the same
machine load; the table then gives the ratio of the two medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # the gnnst of this checkout, whatever is installed

from _results import machine_info, write_section  # noqa: E402

STAGES = ("read", "model_load", "model_wait", "decode", "crop", "patch_wait", "encode", "panel", "alongside_wait",
          "graph", "write", "total")


def _build_child(out: str, cache: str, overrides: list[str], data_root: str | None) -> dict:
    import resource

    from gnnst.config import load_config
    from gnnst.graph.dataset import build_graphs
    from gnnst.runtime import tune_malloc

    tune_malloc()  # as the command line does (the baseline runs through it)
    t0 = time.perf_counter()
    over = [f"data.cache_dir={cache}", *overrides] + ([f"data.data_root={data_root}"] if data_root else [])
    cfg = load_config(REPO / "configs" / "her2st.yaml", over)
    res = build_graphs(cfg, out, progress=False)
    t = dict(res.timings)
    t["process"] = time.perf_counter() - t0  # includes importing gnnst's dependencies and the model
    t["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t["nodes"] = res.info["total_nodes"]
    return t


def _in_child(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1) as pool:  # a fresh interpreter per build
        return pool.submit(_build_child, *args).result()


def compute_floor(num_patches: int, threads: int) -> dict:
    """Encoder FLOPs for ``num_patches`` and this machine's float32 matmul rate (same thread count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gnnst.data.encoders import create_encoder

    torch.set_num_threads(threads)
    enc = create_encoder("efficientnet_lite0")
    x = torch.rand(1, 3, enc.input_size, enc.input_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        enc.model(x)
    flops_per_patch = fc.get_total_flops()  # multiply-add = 2 FLOPs
    n = 2048
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    rate = 2 * n**3 / statistics.median(times)
    total = flops_per_patch * num_patches
    return {"gflops_per_patch": flops_per_patch / 1e9, "gflops_total": total / 1e9,
            "matmul_gflops_per_s": rate / 1e9, "floor_seconds": total / rate}


def _baseline_cold(tree: str, out: str, cache: str, data_root: str | None) -> dict:
    """One cold build by the code in ``tree`` (a fresh ``python -m gnnst`` process): its stage times
    from the build's log line, and the process's wall time."""
    import ast
    import os
    import re
    import subprocess

    env = dict(os.environ, PYTHONPATH=tree)
    if data_root:
        env["GNNST_DATA_ROOT"] = data_root
    cmd = [sys.executable, "-m", "gnnst", "build-graphs", "--config", f"{tree}/configs/her2st.yaml", "--out", out,
           "--cache-dir", cache]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"baseline build failed ({' '.join(cmd)}):\n{p.stderr[-2000:]}")
    m = re.search(r"built \d+ graphs \(\d+ nodes\) in [\d.]+ s: (\{.*\})", p.stderr)
    t = ast.literal_eval(m.group(1)) if m else {}
    t["process"] = wall
    return t


def run_build_benchmark(repeats: int = 3, data_root: str | None = None, baseline: str | None = None) -> dict:
    """Cold builds (fresh cache each), warm builds, and a warm rebuild with only ``graph.k`` changed;
    with ``baseline``, cold builds of that revision interleaved with them."""
    import os
    import subprocess

    cold, warm, rebuild, base = [], [], [], []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gnnst-bench-") as tmp:
        tree = f"{tmp}/baseline"
        if baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", tree, baseline], check=True,
                           capture_output=True)
            rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        try:
            for i in range(repeats):
                cache = f"{tmp}/cache{i}"
                # ABBA order: the baseline's cold build goes first in even repeats and right after this
                # checkout's in odd ones, so neither always follows the other's heavy run
                if baseline and i % 2 == 0:
                    base.append(_baseline_cold(tree, f"{tmp}/base{i}", f"{tmp}/bcache{i}", data_root))
                cold.append(_in_child(f"{tmp}/cold{i}", cache, [], data_root))
                if baseline and i % 2 == 1:
                    base.append(_baseline_cold(tree, f"{tmp}/base{i}", f"{tmp}/bcache{i}", data_root))
                warm.append(_in_child(f"{tmp}/warm{i}", cache, [], data_root))
                rebuild.append(_in_child(f"{tmp}/k8_{i}", cache, ["graph.k=8"], data_root))
        finally:
            if baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tree], capture_output=True)
    threads = len(os.sched_getaffinity(0))
    floor = compute_floor(cold[0]["nodes"], threads)

    def med(runs, key):
        return statistics.median(r.get(key, 0.0) for r in runs)

    out = {"repeats": repeats, "threads": threads, "floor": floor,
           "cold": {k: med(cold, k) for k in (*STAGES, "process", "peak_rss_mb")},
           "warm": {k: med(warm, k) for k in (*STAGES, "process", "peak_rss_mb")},
           "rebuild_k8": {k: med(rebuild, k) for k in ("total", "process", "encode")},
           "nodes": cold[0]["nodes"], "cold_totals": [r["total"] for r in cold],
           "load": [list(load_before), list(os.getloadavg())]}
    if baseline:
        out["baseline"] = {"rev": rev, "totals": [r.get("total", 0.0) for r in base],
                           "processes": [r["process"] for r in base],
                           "cold": {k: med(base, k) for k in {k for r in base for k in r}}}
    out["encode_fraction_of_floor"] = floor["floor_seconds"] / max(out["cold"]["encode"], 1e-9)
    return out


def format_table(r: dict) -> str:
    c, w, f = r["cold"], r["warm"], r["floor"]
    rows = [
        "| stage | cold (s) | warm (s) |",
        "|---|---|---|",
        *[f"| {s} | {c[s]:.2f} | {w[s]:.2f} |" for s in STAGES],
        f"| whole process (imports, model load, build) | {c['process']:.2f} | {w['process']:.2f} |",
        f"| peak RSS (MB) | {c['peak_rss_mb']:.0f} | {w['peak_rss_mb']:.0f} |",
    ]
    b = r.get("baseline")
    if b:
        bc = b["cold"]
        rows += [
            "",
            f"**Against commit {b['rev']}** (cold builds of that code, interleaved with the ones above, alternating "
            "which goes first, same machine):",
            "",
            "| cold build | this checkout (s) | " + b["rev"] + " (s) | ratio |",
            "|---|---|---|---|",
            f"| total (in the build) | {c['total']:.2f} | {bc.get('total', float('nan')):.2f} | "
            f"{c['total'] / max(bc.get('total', float('nan')), 1e-9):.2f}x |",
            f"| whole process | {c['process']:.2f} | {bc['process']:.2f} | {c['process'] / bc['process']:.2f}x |",
            "",
            f"- {b['rev']} stages (s, medians): " + ", ".join(f"{k} {v:.2f}" for k, v in bc.items()
                                                            if k not in ("total", "process")) + "; totals: "
            + ", ".join(f"{t:.1f}" for t in b["totals"]) + " s.",
        ]
    rows += [
        "",
        f"- {r['nodes']} spots; medians over {r['repeats']} runs, each in a fresh process; cold totals: "
        + ", ".join(f"{t:.1f}" for t in r["cold_totals"]) + " s.",
        f"- Rebuild with only `graph.k=8` (warm cache): {r['rebuild_k8']['total']:.2f} s in the build "
        f"({r['rebuild_k8']['process']:.2f} s with process start); encoder time {r['rebuild_k8']['encode']:.2f} s "
        "(nothing re-encoded).",
        f"- Encoder compute floor: {f['gflops_per_patch']:.3f} GFLOP/patch x {r['nodes']} = "
        f"{f['gflops_total']:.0f} GFLOP; float32 matmul rate measured here with {r['threads']} threads: "
        f"{f['matmul_gflops_per_s']:.0f} GFLOP/s; floor {f['floor_seconds']:.2f} s. The encode stage "
        f"reached {100 * r['encode_fraction_of_floor']:.0f}% of it (depthwise convolutions, the "
        "TF-'same' padding copies and the activations are memory-bound, far from the matmul rate; the batch "
        "norms are folded into the convolutions, see `gnnst.data.encoders.fold_batchnorm`).",
        "- Stages overlap: on CUDA the encoder is built in a thread while the slides are `read` (on CPU after them, in the main thread: both are Python-bound there) (`model_wait`: what "
        "the build then still waited for it); `decode` runs in a background thread (or the patch workers, "
        "`encoder.num_workers`) while the encoder runs, `patch_wait` is what the encoder waited for patches; "
        "the gene `panel` is chosen in a thread while the patches are encoded (`alongside_wait`: what the "
        "build then still waited for it). `total` is the wall time of the build.",
    ]
    if "load" in r:
        rows.append("- Load average (1/5/15 min) before " + ", ".join(f"{x:.1f}" for x in r["load"][0]) + ", after "
                    + ", ".join(f"{x:.1f}" for x in r["load"][1]) + ".")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    p.add_argument("--note", default="", help="a remark to record with the table (e.g. a shared machine)")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also time cold builds of this git revision, interleaved, and give the ratio")
    args = p.parse_args(argv)
    r = run_build_benchmark(args.repeats, args.data_root, args.baseline)
    table = format_table(r)
    print(machine_info())
    print(table)
    if not args.no_write:
        body = table + (f"\n- Note: {args.note}" if args.note else "")
        write_section("build_graphs", "Graph building on her2st-6 (`benchmarks/build_graphs.py`)", body)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "build_graphs.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
