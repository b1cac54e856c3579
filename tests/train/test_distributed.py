"""The DDP path with two CPU processes (gloo backend, loopback only)."""

import socket

import numpy as np
import pytest
import torch

from gnnst_testdata import untimed

from gnnst.graph.edges import edge_features, spatial_edges


def _graph(n=48, seed=0):
    from torch_geometric.data import Data

    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2)) * 1000
    ei = spatial_edges(pos, k=4)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    y = (x[:, :4] @ rng.normal(size=(4, 5))).astype(np.float32)
    return Data(x=torch.from_numpy(x), y=torch.from_numpy(y), pos=torch.tensor(pos, dtype=torch.float32),
                edge_index=torch.from_numpy(ei), edge_attr=torch.from_numpy(edge_features(pos, ei)), num_nodes=n)


def _worker(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gnnst.config import load_config
    from gnnst.models import create_model
    from gnnst.train.distributed import cleanup, init_distributed
    from gnnst.train.prepare import carve_validation, node_subgraph
    from gnnst.train.trainer import fit

    info = init_distributed("cpu")
    assert info.world_size == world and info.rank == rank
    cfg = load_config(None, ["train.epochs=3", "train.batch_nodes=16", "model.hidden=32", "model.proj_dim=16",
                             "model.heads=2", "train.device=cpu", "train.distributed=ddp"])
    graphs = [_graph(seed=0), _graph(seed=1)]
    masks = carve_validation(graphs, 0.2, 0)
    train = [node_subgraph(g, ~m) for g, m in zip(graphs, masks)]
    torch.manual_seed(0)
    model = create_model("gnnst", in_dim=16, num_genes=5, cfg=cfg.model)
    res = fit(model, train, graphs, masks, cfg, progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"params": flat, "history": res.history}, f"{out_dir}/rank{rank}.pt")
    cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    torch.testing.assert_close(r0["params"], r1["params"])  # gradients were all-reduced every step
    # each rank trains on its own batches, but validation (on the synced model) agrees, so early stopping does
    assert [h["val_pcc"] for h in r0["history"]] == [h["val_pcc"] for h in r1["history"]]
    assert all(np.isfinite(h["loss"]) for h in r0["history"])
    init = torch.cat([p.detach().flatten() for p in _init_params()])
    assert not torch.allclose(init, r0["params"])  # it trained


def _init_params():
    from gnnst.config import load_config
    from gnnst.models import create_model

    cfg = load_config(None, ["model.hidden=32", "model.proj_dim=16", "model.heads=2"])
    torch.manual_seed(0)
    return create_model("gnnst", in_dim=16, num_genes=5, cfg=cfg.model).parameters()


def _folds_worker(rank, world, port, args):
    """One rank of `gnnst train` under torchrun with ``train.distributed: folds`` (the default)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from gnnst.cli import main

    assert main(args) == 0


@pytest.mark.slow
def test_folds_mode_two_cpu_processes_give_the_metrics_of_one(tmp_path):
    """The ensemble members of a fold spread over two gloo ranks (0 and 1 on rank 0, 2 on rank 1): the same
    metrics and the same trained members as one process."""
    import json

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from gnnst.cli import main
    from gnnst_tinyrun import TINY_RUN, data_args, tiny_dataset

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run = ["train", *data_args(tiny_dataset(tmp_path)), "--quiet", *TINY_RUN, "train.ensemble=3",
           "eval.only_folds=[S3]", "eval.figures=false", "eval.final_model=false", "train.device=cpu"]
    assert main([*run, "--out", str(tmp_path / "one")]) == 0
    mp.spawn(_folds_worker, args=(2, _free_port(), [*run, "--out", str(tmp_path / "two")]), nprocs=2, join=True)
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    for key in ("summary", "folds"):
        assert untimed(a[key]) == untimed(b[key]), key
    assert len(a["folds"][0]["val_pcc_members"]) == 3
    fold = "folds/patient_P3"
    s1, s2 = (torch.load(tmp_path / r / fold / "model.pt", weights_only=True)["states"] for r in ("one", "two"))
    assert len(s1) == len(s2) == 3
    for x, y in zip(s1, s2):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    # each member trained once, by one rank, and handed to the fold's owner as a file
    assert all((tmp_path / "two" / fold / f"member{i}" / f).is_file() for i in range(3) for f in ("last.pt", "member.pt"))


def _recording_worker(rank, world, port, args, record):
    """A rank of `gnnst train` that records which folds it prepared (panel, targets: the costly part)."""
    import json
    import os

    import gnnst.train.prepare as prepare

    real, seen = prepare.prepare_training, []

    def recording(cfg, source, train_slides, test_slides, **kw):
        seen.append(list(test_slides))
        return real(cfg, source, train_slides, test_slides, **kw)

    prepare.prepare_training = recording
    try:
        _folds_worker(rank, world, port, args)
    finally:
        prepare.prepare_training = real
        with open(os.path.join(record, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)


@pytest.mark.slow
def test_folds_spread_over_two_cpu_processes_give_the_metrics_of_one(tmp_path):
    """Three folds x two members over two gloo ranks: units (fold, member) in contiguous blocks, so rank 0
    prepares folds 1-2 and rank 1 folds 2-3 (not every fold on every rank); the same metrics and members as
    one process, and a resume of the finished run redoes nothing."""
    import json

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from gnnst.cli import main
    from gnnst_tinyrun import TINY_RUN, data_args, tiny_dataset

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    run = ["train", *data_args(tiny_dataset(tmp_path)), "--quiet", *TINY_RUN, "train.ensemble=2",
           "eval.figures=false", "train.device=cpu"]  # the final model too: its members spread as before
    assert main([*run, "--out", str(tmp_path / "one")]) == 0
    mp.spawn(_recording_worker, args=(2, _free_port(), [*run, "--out", str(tmp_path / "two")], str(tmp_path)),
             nprocs=2, join=True)
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    for key in ("summary", "folds", "baselines"):
        assert untimed(a[key]) == untimed(b[key]), key
    assert [f["name"] for f in b["folds"]] == ["patient_P1", "patient_P2", "patient_P3"]
    prepared = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert prepared == [[["S1"], ["S2"], []], [["S2"], ["S3"], []]]  # then the final model's (no test slide)
    for fold in ("folds/patient_P1", "folds/patient_P2", "folds/patient_P3", "final"):
        s1, s2 = (torch.load(tmp_path / r / fold / "model.pt", weights_only=True)["states"] for r in ("one", "two"))
        assert len(s1) == len(s2) == 2
        for x, y in zip(s1, s2):
            for k in x:
                assert torch.equal(x[k], y[k]), (fold, k)
    assert (tmp_path / "two" / "predictions" / "S3.h5ad").is_file()  # written by rank 1, fold 3's owner
    mp.spawn(_recording_worker, args=(2, _free_port(), [*run, "--out", str(tmp_path / "two"), "--resume"],
                                      str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[], []]
    c = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert untimed(c["summary"]) == untimed(a["summary"])
    # fold 3 trained but not scored (stopped in between): only its owner prepares it again, to score it
    (tmp_path / "two" / "folds" / "patient_P3" / "result.json").unlink()
    mp.spawn(_recording_worker, args=(2, _free_port(), [*run, "--out", str(tmp_path / "two"), "--resume"],
                                      str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[["S3"]], []]
    c = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert untimed(c["summary"]) == untimed(a["summary"])


def test_spread_units_blocks():
    from gnnst.train.distributed import spread_units

    for folds, members, world in [(6, 3, 2), (6, 3, 4), (3, 2, 2), (1, 3, 2), (2, 1, 5), (5, 3, 8)]:
        blocks = spread_units(folds, members, world)
        assert len(blocks) == world
        flat = [u for b in blocks for u in b]
        assert flat == [(f, i) for f in range(folds) for i in range(members)]  # each once, fold-major, contiguous
        sizes = [len(b) for b in blocks]
        assert max(sizes) - min(sizes) <= 1
        owners = {f: r for r, b in enumerate(blocks) for f, i in b if i == 0}
        assert sorted(owners) == list(range(folds))
    assert spread_units(6, 3, 2) == [[(f, i) for f in range(3) for i in range(3)],
                                     [(f, i) for f in range(3, 6) for i in range(3)]]


def test_a_missing_or_foreign_member_file_is_a_one_line_error(tmp_path):
    from gnnst.errors import GnnstError
    from gnnst.train.ensemble import load_member, save_member
    from gnnst.train.trainer import FitResult

    with pytest.raises(GnnstError, match="missing .* filesystem every rank sees"):
        load_member(tmp_path / "member0" / "member.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(GnnstError, match="other.pt: not a trained member of this run .format None"):
        load_member(tmp_path / "other.pt")
    import pickle

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps(FitResult(best_epoch=0, best_score=0.0)))
    for name in ("junk.pt", "pickled.pt"):
        with pytest.raises(GnnstError, match=f"{name}: not a trained member of this run") as e:
            load_member(tmp_path / name)
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value)  # one line, as torch's own message is not
    member = (FitResult(best_epoch=1, best_score=0.5, history=[{"epoch": 0, "loss": 1.0}]), {"w": torch.ones(2)},
              ("head",), {"head": [np.zeros((3, 2), dtype=np.float32)]})
    save_member(tmp_path / "m.pt", member)
    res, state, modes, val = load_member(tmp_path / "m.pt")
    assert res == member[0] and torch.equal(state["w"], member[1]["w"]) and modes == ("head",)
    assert np.array_equal(val["head"][0], member[3]["head"][0])


def test_folds_ranks_share_a_gpu_over_gloo_and_ddp_needs_a_gpu_per_rank(monkeypatch):
    """Three ranks on a one-GPU machine (CUDA faked: what the process group and the device would be): in
    ``folds`` mode they join over gloo and all take GPU 0; ``ddp`` joins over NCCL, and a rank without a
    GPU of its own is a one-line error before it joins."""
    import torch.distributed as dist

    import gnnst.train.distributed as d
    from gnnst.errors import GnnstError

    calls: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.__setitem__("device", i))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.__setitem__("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    info = d.init_distributed("auto", "folds")
    assert calls == {"backend": "gloo", "device": 0} and (info.rank, info.world_size, info.local_rank) == (2, 3, 2)
    calls.clear()
    with pytest.raises(GnnstError, match=r"ddp needs one GPU per rank, but local rank 2 has none \(1 GPU"):
        d.init_distributed("auto", "ddp")
    assert calls == {}
    monkeypatch.setenv("LOCAL_RANK", "0")
    d.init_distributed("cuda", "ddp")
    assert calls == {"backend": "nccl", "device": 0}
    calls.clear()
    d.init_distributed("cpu", "ddp")  # training on the CPU of a GPU machine
    assert calls == {"backend": "gloo"}
