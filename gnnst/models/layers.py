"""Small building blocks: an MLP, a residual projection head, an edge-aware attention block."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import TransformerConv
from torch_geometric.utils import scatter, softmax


class MLP(nn.Module):
    r"""Two-layer perceptron ``Linear -> GELU -> Dropout -> Linear``.

    Args:
        in_dim: Input width.
        hidden: Width of the hidden layer.
        out_dim: Output width.
        dropout: Dropout after the activation.

    Shapes:
        - **input:** ``[*, in_dim]``
        - **output:** ``[*, out_dim]``
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.hidden, self.out_dim, self.dropout = in_dim, hidden, out_dim, dropout
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, out_dim)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_dim}, {self.hidden}, {self.out_dim}, dropout={self.dropout})"


class ProjectionHead(nn.Module):
    r"""Residual projection as in CLIP-style expression models (BLEEP):
    ``p = Linear(x)``; ``out = LayerNorm(p + Dropout(Linear(GELU(p))))``.

    Args:
        in_dim: Input width.
        out_dim: Output width.
        dropout: Dropout on the residual branch.

    Shapes:
        - **input:** ``[*, in_dim]``
        - **output:** ``[*, out_dim]``
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim, self.dropout = in_dim, out_dim, dropout
        self.proj = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        self.fc.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj(x)
        return self.norm(p + self.drop(self.fc(self.act(p))))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_dim}, {self.out_dim}, dropout={self.dropout})"


class EdgeAttentionBlock(nn.Module):
    r"""Pre-norm transformer block on a graph: each target node attends over its incoming edges
    (the attention of PyG's :class:`~torch_geometric.nn.conv.TransformerConv` with edge features in keys
    and values; ``attn`` holds its weights, :func:`edge_attention` computes it), then a feed-forward layer;
    both with residual connections.

    The attention layer is ``W_1 x_i + sum_j alpha_ij (W_v x_j + W_e e_ij)`` (PyG's
    ``root_weight=True``; PyG builds ``W_1`` in any case, so it is used rather than left dead).
    With ``residual=True`` the result is added to the target's own state (message passing).
    With ``residual=False`` the block is a read-out: the targets only supply the query and the
    ``W_1`` term, and the output is the target's view of its sources. A node without incoming
    edges gets ``W_1 x_i`` alone (never NaN).

    Args:
        dim: Node width (sources and targets).
        edge_dim: Width of the edge features.
        heads: Attention heads; must divide ``dim``.
        dropout: Dropout on attention weights and on both residual branches.
        residual: Add the attention output to the target state (``True``) or not.

    Shapes:
        - **input:** x_src ``[N_src, dim]``, x_dst ``[N_dst, dim]``, edge_index ``[2, E]``
          (row 0 source, row 1 target), edge_attr ``[E, edge_dim]``
        - **output:** ``[N_dst, dim]``
    """

    def __init__(self, dim: int, edge_dim: int, heads: int, dropout: float = 0.0, residual: bool = True):
        super().__init__()
        self.dim, self.edge_dim, self.heads, self.dropout, self.residual = dim, edge_dim, heads, dropout, residual
        self.norm = nn.LayerNorm(dim)
        self.attn = TransformerConv(
            dim, dim // heads, heads=heads, concat=True, dropout=dropout, edge_dim=edge_dim, root_weight=True
        )
        self.drop = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = MLP(dim, 2 * dim, dim, dropout)

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.attn.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.ffn.reset_parameters()

    def forward(self, x_src: Tensor, x_dst: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        return self.forward_projected(x_src, x_dst, edge_index, self.attn.lin_edge(edge_attr))

    def forward_projected(self, x_src: Tensor, x_dst: Tensor, edge_index: Tensor, edge_proj: Tensor) -> Tensor:
        """:meth:`forward` with the edge features already projected by the attention's ``lin_edge``:
        ``edge_proj [E, dim] = attn.lin_edge(edge_attr)`` (:class:`~gnnst.models.neighbour.NeighborBranch`
        projects the edges of all its layers in one product)."""
        m = edge_attention(self.attn, self.norm(x_src), self.norm(x_dst), edge_index, edge_proj)  # [N_dst, dim]
        h = x_dst + self.drop(m) if self.residual else m
        return h + self.drop(self.ffn(self.ffn_norm(h)))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.dim}, edge_dim={self.edge_dim}, heads={self.heads}, "
            f"residual={self.residual})"
        )


def edge_attention(conv: TransformerConv, x_src: Tensor, x_dst: Tensor, edge_index: Tensor, edge_proj: Tensor
                   ) -> Tensor:
    r"""The attention of PyG's :class:`~torch_geometric.nn.conv.TransformerConv` (``concat=True``,
    ``root_weight=True``, no ``beta``; its weights ``conv.lin_*``), with the edge features given already
    projected by ``conv.lin_edge``: ``W_1 x_i + sum_j alpha_ij (W_v x_j + e_ij)``, ``alpha_ij = softmax_j(
    (W_q x_i) . (W_k x_j + e_ij) / sqrt(C))`` per head, dropout on ``alpha`` as PyG (the same random draws).
    Equal to ``conv((x_src, x_dst), edge_index, edge_attr)`` with ``edge_proj = conv.lin_edge(edge_attr)``
    up to float rounding (tested); a target without incoming edges gets ``W_1 x_i``.

    Shapes:
        - **input:** x_src ``[N_src, F]``, x_dst ``[N_dst, F]``, edge_index ``[2, E]`` (row 0 source, row 1
          target), edge_proj ``[E, H * C]``
        - **output:** ``[N_dst, H * C]``
    """
    H, C = conv.heads, conv.out_channels
    src, dst = edge_index[0], edge_index[1]
    n = x_dst.size(0)
    e = edge_proj.view(-1, H, C)
    query = conv.lin_query(x_dst).view(-1, H, C)
    key = conv.lin_key(x_src).view(-1, H, C)
    value = conv.lin_value(x_src).view(-1, H, C)
    alpha = (query.index_select(0, dst) * (key.index_select(0, src) + e)).sum(dim=-1) / math.sqrt(C)  # [E, H]
    alpha = softmax(alpha, dst, None, n)
    alpha = F.dropout(alpha, p=conv.dropout, training=conv.training)
    msg = (value.index_select(0, src) + e) * alpha.unsqueeze(-1)  # [E, H, C]
    out = scatter(msg, dst, 0, dim_size=n, reduce="sum").view(n, H * C)
    return out + conv.lin_skip(x_dst)
