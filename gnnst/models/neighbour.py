"""The neighbour branch: edge-aware attention message passing, then a centre read-out."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gnnst.errors import GnnstError
from gnnst.models.layers import MLP, EdgeAttentionBlock


class NeighborBranch(nn.Module):
    r"""Attention message passing over the spot graph, read out by each centre spot.

    The edge features (already dimensionless, e.g. ``(dx, dy, distance) / edge_scale_um``) are
    encoded by an MLP and enter the keys and values of every attention layer (through its own
    linear map; the MLP's last layer and these maps are applied as one product,
    :meth:`edge_projections`).
    ``num_layers - 1`` rounds of self-attention message passing (residual, pre-norm) let each
    neighbour gather its own context; a last round of cross-attention, with the centre's input
    embedding as the query and its neighbours' states as keys and values, summarises the
    neighbourhood as seen from that centre (the centre enters only as the query and through the
    attention layer's root term, not through a residual); the caller fuses it with the spot's
    own embedding.

    Nodes without incoming edges get an embedding of their own input alone (never NaN), so
    ``E = 0`` works.

    Args:
        dim: Node embedding size.
        heads: Attention heads per layer; must divide ``dim``.
        num_layers: Message-passing rounds, including the read-out; the receptive field is
            ``num_layers`` hops.
        edge_dim: Width of the input edge features.
        dropout: Dropout on attention weights and residual branches.

    Shapes:
        - **input:** x ``[N, dim]``, edge_index ``[2, E]`` (row 0 neighbour, row 1 centre),
          edge_attr ``[E, edge_dim]``
        - **output:** ``[N, dim]``
    """

    def __init__(self, dim: int, heads: int, num_layers: int, edge_dim: int = 3, dropout: float = 0.0):
        super().__init__()
        if num_layers < 1:
            raise GnnstError(f"NeighborBranch: num_layers must be >= 1, got {num_layers}")
        if dim % heads:
            raise GnnstError(f"NeighborBranch: heads={heads} does not divide dim={dim}")
        self.dim, self.heads, self.num_layers, self.edge_dim = dim, heads, num_layers, edge_dim
        self.edge_encoder = MLP(edge_dim, dim, dim)
        self.layers = nn.ModuleList(
            EdgeAttentionBlock(dim, dim, heads, dropout, residual=True) for _ in range(num_layers - 1)
        )
        self.readout = EdgeAttentionBlock(dim, dim, heads, dropout, residual=False)
        self.out_norm = nn.LayerNorm(dim)

    def reset_parameters(self) -> None:
        self.edge_encoder.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        self.readout.reset_parameters()
        self.out_norm.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        e = self.edge_projections(edge_attr)  # [E, dim] per layer
        h = x
        for layer, e_l in zip(self.layers, e):
            h = layer.forward_projected(h, h, edge_index, e_l)  # [N, dim]
        return self.out_norm(self.readout.forward_projected(h, x, edge_index, e[-1]))  # [N, dim]

    def edge_projections(self, edge_attr: Tensor) -> tuple[Tensor, ...]:
        """Each layer's projection of the encoded edges, ``attn.lin_edge(edge_encoder(edge_attr))`` ``[E, dim]``
        (layers in order, the read-out last), in one product: the encoder's last linear layer is composed
        with every layer's ``lin_edge`` (no bias), ``[L * dim, dim]``, so the ``[E, dim]`` edge encoding is
        never formed: two ``E x dim x dim`` products a layer become one (float rounding aside, the same)."""
        enc = self.edge_encoder
        hidden = enc.drop(enc.act(enc.fc1(edge_attr)))  # [E, dim]
        w_edge = torch.cat([b.attn.lin_edge.weight for b in (*self.layers, self.readout)])  # [L * dim, dim]
        proj = torch.addmm(w_edge @ enc.fc2.bias, hidden, (w_edge @ enc.fc2.weight).T)  # [E, L * dim]
        return proj.split(self.dim, dim=1)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.dim}, heads={self.heads}, num_layers={self.num_layers}, "
            f"edge_dim={self.edge_dim})"
        )
