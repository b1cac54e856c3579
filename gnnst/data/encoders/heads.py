"""Read-outs on top of a timm ViT trunk: how a foundation model's tokens become one embedding.

Imported only when a recipe is built (:func:`gnnst.data.encoders.recipes.build_network`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gnnst.errors import GnnstError


class TokenReadout(nn.Module):
    r"""A timm ViT and how its tokens become one vector.

    Args:
        trunk: a timm ``VisionTransformer``.
        pooling: ``cls``: the trunk's own forward (timm's ``global_pool='token'`` head: the class token
            after the final norm); ``cls+mean``: the class token concatenated with the mean of the patch
            tokens, register tokens excluded (Virchow2; the trunk is built with ``global_pool=''``).

    Shapes:
        - **input:** ``[B, 3, S, S]`` normalised image
        - **output:** ``[B, D]`` (``[B, 2D]`` for ``cls+mean``)
    """

    def __init__(self, trunk: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("cls", "cls+mean"):
            raise GnnstError(f"unknown pooling '{pooling}' (known: cls, cls+mean)")
        self.trunk = trunk
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return self.trunk(x)
        tokens = self.trunk(x)  # [B, T, D]: every token after the final norm
        prefix = self.trunk.num_prefix_tokens  # class token + registers
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)  # [B, 2D]

    def __repr__(self) -> str:
        return f"TokenReadout({type(self.trunk).__name__}, pooling={self.pooling!r})"


class AttentionalPooler(nn.Module):
    r"""Learned queries attending over the tokens (CONCH's contrastive pooler), in the authors'
    parameter names: ``query``, ``ln_q``, ``ln_k``, ``to_q``, ``to_kv``, ``to_out``.

    Args:
        d_model: query and output width.
        context_dim: token width.
        n_head: attention heads.
        n_queries: learned queries.

    Shapes:
        - **input:** ``[B, T, context_dim]``
        - **output:** ``[B, n_queries, d_model]``
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query)
        for m in (self.ln_k, self.ln_q, self.to_q, self.to_kv, self.to_out):
            m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # [B, T, d] each
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # [B, Q, d]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, h, L, d / h]
            return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # [B, h, Q, d / h]
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))  # [B, Q, d]

    def __repr__(self) -> str:
        return (f"AttentionalPooler(d_model={self.query.shape[1]}, context_dim={self.ln_k.normalized_shape[0]}, "
                f"heads={self.heads}, queries={self.query.shape[0]})")


class ConchVisionTower(nn.Module):
    r"""CONCH v1.5's image encoder: ViT-L/16 tokens -> attentional pooler -> layer norm.

    Attribute names follow the authors' file (``trunk``, ``attn_pool_contrast``, ``ln_contrast``).

    Args:
        trunk: a timm ViT built for the 448-px input (``global_pool=''``).

    Shapes:
        - **input:** ``[B, 3, 448, 448]`` normalised image
        - **output:** ``[B, 768]``
    """

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=trunk.num_features, n_head=8,
                                                    n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # [B, 1 + 28 * 28, 1024] after the final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # [B, 768]
