"""``torchrun --nproc_per_node 2 -m gnnst build-graphs``, emulated with two CPU processes (gloo)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from gnnst.data.sharding import Shard, assign


def test_shards_are_balanced_and_agreed():
    sizes = [5, 1, 1, 1, 4, 3]
    owner = assign(sizes, 2)
    assert owner == assign(sizes, 2)  # every rank computes the same
    loads = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [7, 8]
    assert assign([3, 3], 4) == [0, 1] and assign([2, 1], 1) == [0, 0]


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Shard.from_env() == Shard(0, 1, 0) and Shard.from_env().is_main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Shard.from_env() == Shard(3, 4, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(ds: dict, out: str) -> list[str]:
    return ["build-graphs", "--manifest", ds["manifest"], "--data-root", ds["root"], "--cache-dir", ds["cache"],
            "--out", out, "--quiet", "graph.k=4", "encoder.num_threads=1"]


def _rank(rank: int, world: int, port: int, ds: dict, out: str, fail_rank: int, workers: int) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    if rank == fail_rank:  # this rank dies while embedding its slides
        import gnnst.data.embeddings as emb

        def die(*a, **k):
            raise SystemExit(3)

        emb.embed_slides = die
    from gnnst.cli import main

    assert main(_args(ds, out) + [f"encoder.num_workers={workers}"]) == 0


def _spawn(ds: dict, out, *, fail_rank: int = -1, workers: int = 0) -> None:
    import torch.multiprocessing as mp

    args = {k: str(v) for k, v in ds.items() if k in ("manifest", "root", "cache")}
    mp.spawn(_rank, args=(2, _free_port(), args, str(out), fail_rank, workers), nprocs=2, join=True)


def _cached(ds) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (ds["cache"] / "embeddings").rglob("*.npz")}


@pytest.mark.slow
def test_two_ranks_build_what_one_process_builds_and_a_dead_rank_is_redone(tiny_dataset):
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ds = tiny_dataset
    # rank 1 dies: nothing is written, rank 0's slide is cached and survives
    out = ds["tmp"] / "sharded"
    with pytest.raises(mp.ProcessExitedException):
        _spawn(ds, out, fail_rank=1)
    assert not (out / "dataset.json").exists()
    first = _cached(ds)
    assert [n.split("-")[0] for n in first] == ["S1"]  # S1 is rank 0's (assign: largest first, ties to rank 0)
    # the rerun (two ranks again) embeds only rank 1's slide, and rank 0 writes the dataset once
    _spawn(ds, out, workers=1)
    info = json.loads((out / "dataset.json").read_text())
    assert sorted(info["slides"]) == ["S1", "S2"] and info["total_nodes"] == 24
    now = _cached(ds)
    assert len(now) == 2 and all(now[n] == t for n, t in first.items())
    # the same embeddings as one process computes
    from gnnst.data.embeddings import embed_slides
    from gnnst.data.encoders import create_encoder
    from gnnst.data.manifest import load_manifest
    from gnnst.data.slides import read_slide

    m = load_manifest(ds["manifest"])
    adatas = [read_slide(m, e, data_root=ds["root"], cache_dir=ds["cache"], download=False) for e in m.select(None)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (the thread count moves float32 results by rounding)
    try:
        ref = embed_slides(adatas, create_encoder("efficientnet_lite0"), size_um=150.0, progress=False)
    finally:
        torch.set_num_threads(threads)
    for s, r in zip(("S1", "S2"), ref):
        g = torch.load(out / f"{s}.pt", weights_only=False)
        assert g.x.numpy().tobytes() == r.tobytes() and g.edge_index.shape == (2, 48)
