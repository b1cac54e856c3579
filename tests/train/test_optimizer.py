"""The optimiser of every fit (gnnst.train.trainer.make_optimizer): the multi-tensor AdamW update equals the
per-parameter loop bit for bit on a CPU, so choosing it for speed changes no result."""

from __future__ import annotations

import torch

from gnnst.config import load_config
from gnnst.models import create_model
from gnnst.train.trainer import make_optimizer


def test_foreach_adamw_equals_the_per_parameter_loop():
    cfg = load_config(None, ["model.hidden=32", "model.proj_dim=16", "model.heads=2", "train.weight_decay=0.01"])
    states = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = create_model("gnnst_mlp", in_dim=12, num_genes=5, cfg=cfg.model)
        opt = make_optimizer(model, cfg.train) if fast else torch.optim.AdamW(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False)
        assert opt.param_groups[0]["foreach"] is fast
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            x, y = torch.randn(40, 12, generator=gen), torch.randn(40, 5, generator=gen)
            loss = ((model.head(model.img_encoder(x)) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
