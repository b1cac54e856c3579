"""The device-resident sampler gives the host sampler's batches (run on CPU: the same code as on CUDA)."""

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from gnnst.graph.device_sampler import DeviceSubgraphLoader, device_bytes
from gnnst.graph.edges import edge_features, spatial_edges
from gnnst.graph.sampler import SubgraphLoader


def _slide(n, seed=0, k=4, half=False):
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2)) * 2000
    ei = spatial_edges(pos, k=k)
    dt = torch.float16 if half else torch.float32
    return Data(x=torch.randn(n, 8).to(dt), y=torch.randn(n, 3).to(dt), pos=torch.tensor(pos, dtype=torch.float32),
                edge_index=torch.from_numpy(ei), edge_attr=torch.from_numpy(edge_features(pos, ei)), num_nodes=n)


def _same(a, b):
    for key in ("x", "y", "pos", "edge_index", "edge_attr", "center_mask", "center_index", "node_id", "slide", "batch",
                "ptr"):
        ta, tb = a[key], b[key]
        assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb), key


@pytest.mark.parametrize("num_hops", [0, 1, 2, 3])
def test_device_batches_equal_host_batches(num_hops):
    """Several slides (one in float16, one with a node mask, centre masks), shuffled over two epochs."""
    from gnnst.train.prepare import with_node_mask

    rng = np.random.default_rng(5)
    graphs = [_slide(300, 0), _slide(7, 1, k=3, half=True), with_node_mask(_slide(200, 2), rng.random(200) < 0.7)]
    centre = [rng.random(300) < 0.8, None, None]
    kw = dict(batch_nodes=64, num_hops=num_hops, shuffle=True, seed=3, centre_masks=centre)
    host, dev = SubgraphLoader(graphs, **kw), DeviceSubgraphLoader(graphs, device="cpu", **kw)
    for epoch in (0, 1):
        host.set_epoch(epoch)
        dev.set_epoch(epoch)
        hb, db = list(host), list(dev)
        assert len(hb) == len(db) > 3
        for a, b in zip(hb, db):
            _same(a, b)
            assert torch.equal(b.global_node, torch.from_numpy(dev.offsets)[b.slide] + b.node_id)
            assert torch.equal(b.center_index, torch.nonzero(b.center_mask).flatten())


def test_refreshed_x_reaches_the_device_batches():
    """x changed on the host (an epoch's feature views) is what the next batches carry after refresh_x."""
    graphs = [_slide(200, 0), _slide(100, 1)]
    host = SubgraphLoader(graphs, batch_nodes=64, num_hops=2)
    dev = DeviceSubgraphLoader(graphs, batch_nodes=64, num_hops=2, device="cpu")
    for g in graphs:
        g.x = torch.randn_like(g.x)  # a new tensor, as set_views assigns
    dev.refresh_x(graphs)
    for a, b in zip(host, dev):
        _same(a, b)


def test_unshuffled_batches_cover_every_node_once():
    g = _slide(500, 4)
    dev = DeviceSubgraphLoader([g], batch_nodes=128, num_hops=2, device="cpu")
    seen = torch.cat([b.global_node[b.center_mask] for b in dev])
    assert torch.equal(torch.sort(seen).values, torch.arange(500))
    assert device_bytes([g]) > g.x.numel() * 4


@pytest.mark.parametrize("views", [False, True])
def test_fit_with_device_sampler_equals_host_sampler(tmp_path, views):
    """The same losses, validation scores and weights: the device path changes where batches are cut, not what
    is learned; with feature views (``x_views``) each epoch's x is materialised before it goes to the device."""
    from gnnst.config import load_config
    from gnnst.models import create_model
    from gnnst.train.prepare import carve_validation, with_node_mask
    from gnnst.train.trainer import fit

    from gnnst import keys

    graphs = [_slide(150, 0), _slide(120, 1)]
    masks = carve_validation(graphs, 0.2, 0)
    results = {}
    for sampler in ("host", "device"):
        train = [with_node_mask(g, ~m) for g, m in zip(graphs, masks)]
        if views:  # view 0 = x, views 1-2 other embeddings
            gen = torch.Generator().manual_seed(7)
            for g in train:
                setattr(g, keys.DATA_X_VIEWS, torch.stack([g.x, torch.randn(g.x.shape, generator=gen),
                                                           torch.randn(g.x.shape, generator=gen)]))
        cfg = load_config(None, ["train.epochs=3", "train.batch_nodes=40", "model.hidden=16", "model.proj_dim=8",
                                 "model.heads=2", f"train.sampler={sampler}", "train.num_threads=1"])
        torch.manual_seed(0)
        model = create_model(cfg.model.name, in_dim=8, num_genes=3, cfg=cfg.model)
        r = fit(model, train, graphs, masks, cfg, device=torch.device("cpu"))
        results[sampler] = (r.history, {k: v.clone() for k, v in model.state_dict().items()})
    (h1, s1), (h2, s2) = results["host"], results["device"]
    assert [e["loss"] for e in h1] == pytest.approx([e["loss"] for e in h2], rel=1e-6, abs=1e-9)
    assert [e["val_pcc"] for e in h1] == pytest.approx([e["val_pcc"] for e in h2], rel=1e-5, abs=1e-7)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["host", "device"])
def test_predictions_at_masked_nodes_only(sampler):
    """predict_graphs(masks=...) returns [n_s, G] per graph: the masked nodes' rows of the whole slides'
    predictions, in node order, from either sampler (nothing of the slides' size is allocated)."""
    from gnnst.config import load_config
    from gnnst.models import create_model
    from gnnst.predictor import predict_graphs
    from gnnst.train.trainer import validation_loader

    graphs = [_slide(150, 0), _slide(90, 1), _slide(40, 2)]
    rng = np.random.default_rng(0)
    masks = [rng.random(150) < 0.2, rng.random(90) < 0.5, np.zeros(40, dtype=bool)]
    cfg = load_config(None, ["train.batch_nodes=32", "model.hidden=16", "model.proj_dim=8", "model.heads=2",
                             f"train.sampler={sampler}"])
    torch.manual_seed(0)
    model = create_model(cfg.model.name, in_dim=8, num_genes=3, cfg=cfg.model).eval()
    model.after_fit(graphs, batch_nodes=32)
    kw = dict(batch_nodes=32, num_hops=2, device="cpu", modes=("head", "retrieval"))
    whole = predict_graphs(model, graphs, **kw)
    part = predict_graphs(model, graphs, masks=masks, loader=validation_loader(model, graphs, masks, cfg, "cpu"), **kw)
    for mode in ("head", "retrieval"):
        assert [p.shape for p in part[mode]] == [(int(m.sum()), 3) for m in masks]
        for w, p, m in zip(whole[mode], part[mode], masks):
            np.testing.assert_allclose(p, w[m], rtol=1e-5, atol=1e-6)


def test_the_epochs_picked_views_reach_the_device_batches():
    """Under an epoch's view pick (gnnst.train.views) refresh_x sends each spot's drawn view, slide by slide:
    the device batches equal host batches of copies whose x is that epoch's materialised features."""
    import copy

    from gnnst import keys
    from gnnst.train.views import set_views
    from gnnst_testdata import epoch_features

    graphs = [_slide(200, 0), _slide(100, 1)]
    gen = torch.Generator().manual_seed(3)
    for g in graphs:
        setattr(g, keys.DATA_X_VIEWS, torch.stack([g.x, torch.randn(g.x.shape, generator=gen)]))
    dev = DeviceSubgraphLoader(graphs, batch_nodes=64, num_hops=2, device="cpu")
    set_views(graphs, 2, seed=9)
    dev.refresh_x(graphs)
    want = []
    for i, g in enumerate(graphs):
        w = copy.copy(g)
        del w[keys.DATA_X_PICK]
        w.x = epoch_features(g, 2, seed=9, index=i)
        assert not torch.equal(w.x, g.x)  # some spots took view 1
        want.append(w)
    for a, b in zip(SubgraphLoader(want, batch_nodes=64, num_hops=2), dev, strict=True):
        _same(a, b)
