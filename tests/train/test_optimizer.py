"""The optimiser of every fit (gnnst.train.trainer.make_optimizer): the fused AdamW update equals the
per-parameter loop up to float rounding on a CPU, so choosing it for speed changes no result beyond that."""

from __future__ import annotations

import torch

from gnnst.config import load_config
from gnnst.models import create_model
from gnnst.train.trainer import make_optimizer


def test_fused_adamw_equals_the_per_parameter_loop():
    cfg = load_config(None, ["model.hidden=32", "model.proj_dim=16", "model.heads=2", "train.weight_decay=0.01"])
    states = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = create_model("gnnst_mlp", in_dim=12, num_genes=5, cfg=cfg.model)
        opt = make_optimizer(model, cfg.train) if fast else torch.optim.AdamW(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False)
        assert bool(opt.param_groups[0]["fused"]) is fast
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            x, y = torch.randn(40, 12, generator=gen), torch.randn(40, 5, generator=gen)
            loss = ((model.head(model.img_encoder(x)) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(0)
    start = create_model("gnnst_mlp", in_dim=12, num_genes=5, cfg=cfg.model).state_dict()
    assert not torch.allclose(start["head.fc2.weight"], states[0]["head.fc2.weight"])  # 20 steps moved it
