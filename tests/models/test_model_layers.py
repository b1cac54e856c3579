"""Building blocks and the neighbour branch on hand-made graphs."""

from __future__ import annotations

import pytest
import torch

from gnnst.errors import GnnstError
from gnnst.models import NeighborBranch
from gnnst.models.layers import MLP, EdgeAttentionBlock, ProjectionHead, edge_attention

# a 4-node path 0 - 1 - 2 - 3 (both directions) and an isolated node 4
EDGE_INDEX = torch.tensor([[1, 0, 2, 1, 3, 2], [0, 1, 1, 2, 2, 3]])
EDGE_ATTR = torch.tensor([[1.0, 0, 1], [-1, 0, 1], [1, 0, 1], [-1, 0, 1], [1, 0, 1], [-1, 0, 1]])


def test_reprs():
    assert repr(MLP(4, 8, 2, dropout=0.1)) == "MLP(4, 8, 2, dropout=0.1)"
    assert repr(ProjectionHead(4, 8)) == "ProjectionHead(4, 8, dropout=0.0)"
    assert repr(EdgeAttentionBlock(8, 3, 2)) == "EdgeAttentionBlock(8, edge_dim=3, heads=2, residual=True)"
    assert repr(NeighborBranch(8, 2, 3)) == "NeighborBranch(8, heads=2, num_layers=3, edge_dim=3)"


@pytest.mark.parametrize(
    "module",
    [MLP(4, 8, 4), ProjectionHead(4, 4), EdgeAttentionBlock(4, 3, 2), NeighborBranch(4, 2, 2)],
    ids=lambda m: type(m).__name__,
)
def test_reset_parameters(module):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(0.123)
    module.reset_parameters()
    weights = [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2]
    assert weights and all(not torch.all(w == 0.123) for w in weights)


def test_neighbour_branch_shapes_isolated_and_empty():
    torch.manual_seed(0)
    branch = NeighborBranch(8, heads=2, num_layers=2).eval()
    x = torch.randn(5, 8)
    out = branch(x, EDGE_INDEX, EDGE_ATTR)
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    empty = branch(x, EDGE_INDEX[:, :0], EDGE_ATTR[:0])
    assert torch.isfinite(empty).all()
    # the isolated node 4 sees the same (empty) neighbourhood in both graphs
    torch.testing.assert_close(out[4], empty[4])
    assert not torch.allclose(out[0], empty[0])


def test_neighbour_branch_receptive_field_is_num_layers_hops():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    x2 = x.clone()
    x2[3] = torch.randn(8)  # node 3 is 3 hops from node 0 (not a constant shift: LayerNorm removes it)
    for layers, reaches in ((2, False), (3, True)):
        branch = NeighborBranch(8, heads=2, num_layers=layers).eval()
        a, b = branch(x, EDGE_INDEX, EDGE_ATTR)[0], branch(x2, EDGE_INDEX, EDGE_ATTR)[0]
        assert (not torch.allclose(a, b)) == reaches


def test_neighbour_branch_uses_edge_attr():
    torch.manual_seed(0)
    branch = NeighborBranch(8, heads=2, num_layers=1).eval()
    x = torch.randn(5, 8)
    assert not torch.allclose(branch(x, EDGE_INDEX, EDGE_ATTR), branch(x, EDGE_INDEX, 2 * EDGE_ATTR))


def test_neighbour_branch_bad_arguments():
    with pytest.raises(GnnstError, match="heads"):
        NeighborBranch(10, heads=4, num_layers=2)
    with pytest.raises(GnnstError, match="num_layers"):
        NeighborBranch(8, heads=2, num_layers=0)


def _pyg_block(block: EdgeAttentionBlock, x_src, x_dst, edge_index, edge_attr):
    """The block as written with PyG's TransformerConv forward (the oracle of ``edge_attention``)."""
    m = block.attn((block.norm(x_src), block.norm(x_dst)), edge_index, edge_attr)
    h = x_dst + block.drop(m) if block.residual else m
    return h + block.drop(block.ffn(block.ffn_norm(h)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_edge_attention_equals_pyg_transformer_conv(train):
    # a random graph with repeated edges, a node without incoming edges and more targets than sources
    torch.manual_seed(0)
    block = EdgeAttentionBlock(16, 16, heads=4, dropout=0.3, residual=False).train(train)
    x_src, x_dst = torch.randn(7, 16), torch.randn(9, 16)
    ei = torch.stack([torch.randint(0, 7, (30,)), torch.randint(0, 8, (30,))])  # target 8 gets nothing
    ea = torch.randn(30, 16)
    torch.manual_seed(1)
    ours = block(x_src, x_dst, ei, ea)
    torch.manual_seed(1)  # the same dropout draws
    theirs = _pyg_block(block, x_src, x_dst, ei, ea)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # a target without incoming edges: the root term alone
    att = edge_attention(block.attn.eval(), x_src, x_dst, ei, block.attn.lin_edge(ea))
    torch.testing.assert_close(att[8], block.attn.lin_skip(x_dst[8]))
    assert not torch.allclose(att[:8], block.attn.lin_skip(x_dst[:8]))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_neighbour_branch_fused_edge_projections_equal_the_layer_by_layer_product(layers):
    torch.manual_seed(0)
    branch = NeighborBranch(16, heads=2, num_layers=layers, dropout=0.2).train()
    x = torch.randn(12, 16)
    ei = torch.stack([torch.randint(0, 12, (50,)), torch.randint(0, 12, (50,))])
    ea = torch.randn(50, 3)
    torch.manual_seed(3)
    ours = branch(x, ei, ea)
    torch.manual_seed(3)
    e = branch.edge_encoder(ea)
    h = x
    for layer in branch.layers:
        h = _pyg_block(layer, h, h, ei, e)
    theirs = branch.out_norm(_pyg_block(branch.readout, h, x, ei, e))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # gradients reach every parameter the same way (the composed product is differentiated through)
    g1 = torch.autograd.grad(ours.square().sum(), list(branch.parameters()))
    g2 = torch.autograd.grad(theirs.square().sum(), list(branch.parameters()))
    for (name, _), a, b in zip(branch.named_parameters(), g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
