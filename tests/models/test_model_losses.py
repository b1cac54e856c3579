"""InfoNCE, masked reconstruction and compute_losses (centre nodes, switches, weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gnnst.errors import GnnstError
from gnnst.models import clip_loss, compute_losses, create_model, masked_recon_loss

D, G = 16, 8  # widths of the conftest graphs (x and y)
SMALL = dict(hidden=32, proj_dim=16, heads=2)


def test_clip_loss_aligned_is_near_zero():
    z = torch.eye(32)  # orthonormal rows
    assert clip_loss(z, z, torch.tensor(math.log(100.0))) < 1e-6
    # the scale is clamped at 100: a larger log-scale gives the same loss
    z2 = F.normalize(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(clip_loss(z2, z2, torch.tensor(10.0)), clip_loss(z2, z2, torch.tensor(math.log(100.0))))


def test_clip_loss_random_is_about_log_n():
    gen = torch.Generator().manual_seed(0)
    n = 64
    a = F.normalize(torch.randn(n, 4096, generator=gen), dim=-1)
    b = F.normalize(torch.randn(n, 4096, generator=gen), dim=-1)
    assert abs(clip_loss(a, b, torch.tensor(0.0)).item() - math.log(n)) < 0.05


def test_clip_loss_is_symmetric_and_differentiable():
    gen = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(8, 5, generator=gen), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(8, 5, generator=gen), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = clip_loss(a, b, scale)
    torch.testing.assert_close(loss, clip_loss(b, a, scale))
    loss.backward()
    assert a.grad.abs().sum() > 0 and scale.grad != 0
    with pytest.raises(GnnstError):
        clip_loss(a, b[:4], scale)


def test_masked_recon_loss_counts_only_hidden_entries():
    y = torch.zeros(3, 4)
    y_rec = torch.ones(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = True
    assert masked_recon_loss(y_rec, y, mask) == 1.0
    y_rec2 = y_rec.detach().clone()
    y_rec2[~mask] = 100.0  # visible entries do not count
    assert masked_recon_loss(y_rec2, y, mask) == 1.0
    none = masked_recon_loss(y_rec, y, torch.zeros_like(mask))
    assert none == 0.0
    none.backward()


def test_compute_losses_terms_follow_switches(two_slides):
    def terms(**kw):
        torch.manual_seed(0)
        model = create_model("gnnst", in_dim=D, num_genes=G, **SMALL, **kw)
        return set(compute_losses(model, model(two_slides), two_slides))

    assert terms() == {"mse", "clip_spot", "clip_nbhd", "total"}
    assert terms(use_graph=False) == {"mse", "clip_spot", "total"}
    assert terms(use_contrastive=False) == {"mse", "total"}
    assert terms(use_neighbourhood_scale=False) == {"mse", "clip_spot", "total"}
    assert terms(use_masked_recon=True) == {"mse", "clip_spot", "clip_nbhd", "recon", "total"}
    assert terms(w_clip_nbhd=0.0, w_mse=0.0) == {"clip_spot", "total"}
    with pytest.raises(GnnstError, match="every loss term is off"):
        terms(use_contrastive=False, w_mse=0.0)


def test_compute_losses_weights_and_center_mask(two_slides):
    torch.manual_seed(0)
    model = create_model("gnnst", in_dim=D, num_genes=G, **SMALL, w_mse=2.0).eval()
    out = model(two_slides)
    losses = compute_losses(model, out, two_slides)
    m = two_slides.center_mask
    assert 0 < m.sum() < m.numel()
    torch.testing.assert_close(losses["mse"], 2.0 * F.mse_loss(out["y_hat"][m], two_slides.y[m]))
    expected_clip = clip_loss(out["z_img"][m], out["z_gene"][m], model.logit_scale)
    torch.testing.assert_close(losses["clip_spot"], expected_clip)
    torch.testing.assert_close(losses["total"], sum(v for k, v in losses.items() if k != "total"))

    # without a centre mask every node counts
    del two_slides.center_mask
    torch.testing.assert_close(
        compute_losses(model, out, two_slides)["mse"], 2.0 * F.mse_loss(out["y_hat"], two_slides.y)
    )


def test_compute_losses_errors(two_slides):
    model = create_model("gnnst", in_dim=D, num_genes=G, **SMALL)
    out = model(two_slides)
    bad = two_slides.clone()
    bad.center_mask = torch.zeros_like(bad.center_mask)
    with pytest.raises(GnnstError, match="center_mask"):
        compute_losses(model, out, bad)
    bad.center_mask = torch.arange(bad.num_nodes)
    with pytest.raises(GnnstError, match="center_mask"):
        compute_losses(model, out, bad)
    no_y = two_slides.clone()
    del no_y.y
    with pytest.raises(GnnstError, match="batch.y"):
        compute_losses(model, model(no_y), no_y)
    with pytest.raises(GnnstError, match="z_gene"):
        compute_losses(model, {k: v for k, v in out.items() if k != "z_gene"}, two_slides)


def test_compute_losses_follows_the_built_model(two_slides):
    # the training loop passes cfg.model; gnnst_mlp forces use_graph off whatever it says
    from gnnst.models import ModelConfig

    model = create_model("gnnst_mlp", in_dim=D, num_genes=G, **SMALL)
    cfg = ModelConfig(**SMALL)
    assert cfg.use_graph and not model.cfg.use_graph
    losses = compute_losses(model, model(two_slides), two_slides, cfg)
    assert set(losses) == {"mse", "clip_spot", "total"}
    # an outer cfg can still switch a term off
    off = ModelConfig(**SMALL, use_contrastive=False)
    assert set(compute_losses(model, model(two_slides), two_slides, off)) == {"mse", "total"}
