"""Attention over the image grid, what a decoder that attends (:mod:`captioner.models.decoders`)
reads the image through at every step.

Shapes: B batch, F encoder feature size, P grid positions (h x w), A attention size, H hidden
size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SoftAttention(nn.Module):
    """Additive attention over the image grid (Bahdanau; Xu et al. 2015, eq. 4-5):
    e_p = w . tanh(W_f f_p + W_h h), alpha = softmax_p(e), context = sum_p alpha_p f_p."""

    def __init__(self, feature_dim: int, hidden_size: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_size, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, grid: Tensor, projected: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """grid [P, B, F], projected = feature_proj(grid) [P, B, A] (computed once per image),
        query [B, H] -> context [B, F], weights alpha [B, P] (summing to 1 over positions)."""
        scores = self.score(torch.tanh(projected + self.hidden_proj(query))).squeeze(-1)  # [P, B]
        alpha = scores.softmax(dim=0, dtype=torch.float32).to(grid.dtype)  # float32 under autocast
        return torch.einsum("pb,pbf->bf", alpha, grid), alpha.t()
