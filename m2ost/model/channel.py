"""Channel mixers: the feed-forward block shared by the views, and CCMM across the views.

Same convention as :mod:`m2ost.model.attention`: a list of V tensors ``(B, N_i, dim)`` in and out,
residual connection included.
"""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    """Pre-norm two-layer MLP applied token-wise, one set of weights shared by every view."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x + self.net(x) for x in xs]


class CrossLevelChannelMixing(nn.Module):
    """CCMM: squeeze-and-excitation across views.

    Mean-pool the tokens of every view, concatenate the V pooled vectors, pass them through a
    LayerNorm + MLP + sigmoid, split the result back into V gates and rescale each view's
    channels: ``x_i + x_i * g_i``.

    Parameters
    ----------
    n_views : int
        Number of views.
    dim : int
        Token width of one view.
    hidden : int
        Hidden width of the excitation MLP (over all views together).
    dropout : float
        Dropout inside the MLP.
    """

    def __init__(self, n_views: int, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.n_views = n_views
        self.net = nn.Sequential(
            nn.LayerNorm(n_views * dim),
            nn.Linear(n_views * dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_views * dim),
            nn.Sigmoid(),
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        squeezed = torch.cat([x.mean(dim=1) for x in xs], dim=-1)
        gates = self.net(squeezed).chunk(self.n_views, dim=-1)
        # x + x * g in one pass over the tokens
        return [x * (1 + g.unsqueeze(1)) for x, g in zip(xs, gates)]
