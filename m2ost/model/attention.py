"""Token mixers: self-attention within a view (ITMM) and attention across views (CTMM).

Every mixer takes and returns a list of V tensors ``(B, N_i, dim)`` (one per view, lengths may
differ) and includes its residual connection. All attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention`, which on CPU and GPU runs a fused
(flash-style) kernel and never materialises the N x N attention matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3 * heads * d) from a fused projection -> q, k, v each (B, heads, N, d).

    The results are strided views (no copy); the attention kernels accept them as they are, and
    in backward their gradients are joined by a single concatenation.
    """
    b, n, _ = qkv.shape
    q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    return q, k, v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d); free when the kernel wrote (B, N, heads, d)."""
    b, _, n, _ = x.shape
    return x.transpose(1, 2).reshape(b, n, -1)


class IntraLevelTokenMixing(nn.Module):
    """ITMM: pre-norm multi-head self-attention inside each view, separate weights per view.

    With ``token_mask_ratio > 0`` and in training mode only, a random fraction of every view's
    patch tokens is hidden from the attention (they are masked as keys, so no query can read them;
    the [cls] token is never masked). A regulariser that forces the model to spread its evidence.

    Parameters
    ----------
    n_views : int
        Number of views.
    dim : int
        Token width of one view.
    heads : int
        Attention heads of one view.
    dropout : float
        Dropout on the attention weights and on the output projection.
    token_mask_ratio : float
        Fraction of patch tokens masked per view and sample during training, in [0, 1).
    """

    def __init__(
        self,
        n_views: int,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        token_mask_ratio: float = 0.0,
    ):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.token_mask_ratio = token_mask_ratio
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_views))
        # one fused q/k/v projection per view: one matrix product instead of three
        self.to_qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(n_views))
        self.to_out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_views))
        self.out_drop = nn.Dropout(dropout)

    def key_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Boolean (B, 1, 1, N) mask, True = may be attended; None when masking is off."""
        if not (self.training and self.token_mask_ratio > 0):
            return None
        b, n, _ = x.shape
        n_masked = int(round(self.token_mask_ratio * (n - 1)))
        if n_masked == 0:
            return None
        # exactly n_masked random patch tokens per sample; column 0 ([cls]) stays visible
        drop = torch.rand(b, n - 1, device=x.device).argsort(dim=-1)[:, :n_masked] + 1
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, drop, False)
        return keep[:, None, None, :]

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        p = self.dropout if self.training else 0.0
        out = []
        for x, norm, to_qkv, to_out in zip(xs, self.norms, self.to_qkv, self.to_out):
            q, k, v = split_heads(to_qkv(norm(x)), self.heads)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.key_mask(x), dropout_p=p)
            out.append(x + self.out_drop(to_out(merge_heads(o))))
        return out


class CrossLevelTokenMixing(nn.Module):
    """CTMM: every view queries every other view; each view keeps its own length.

    For query view i and key view j != i: ``A_ij = softmax(Q_i K_j^T / sqrt(d_head)) V_j``
    (multi-head, separate softmax per pair). The contributions are weighted by learnable scalars ``w_ij`` (initialised
    to 1) and projected back to the width of view i by a projection over their concatenation:
    ``out_i = x_i + W_i [w_ij A_ij]_{j != i}``, i.e. one (V-1)*dim -> dim map per view as in the
    authors' code, which the paper's parameter count includes. Q, K and V of a view are computed
    once by one fused projection and reused for every pair.

    Parameters
    ----------
    n_views : int
        Number of views (>= 2).
    dim : int
        Token width of one view.
    heads : int
        Attention heads of one view.
    dropout : float
        Dropout on the attention weights and on the output projection.
    """

    def __init__(self, n_views: int, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if n_views < 2:
            raise ValueError("cross-level token mixing needs at least 2 views")
        self.n_views = n_views
        self.heads = heads
        self.dropout = dropout
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_views))
        self.to_qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(n_views))
        self.to_out = nn.ModuleList(nn.Linear((n_views - 1) * dim, dim) for _ in range(n_views))
        # pair_weights[i, m]: weight of the m-th other view (in view order) for query view i
        self.pair_weights = nn.Parameter(torch.ones(n_views, n_views - 1))
        self.out_drop = nn.Dropout(dropout)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        n_views, p = self.n_views, (self.dropout if self.training else 0.0)
        qkv = [split_heads(to_qkv(norm(x)), self.heads)
               for x, norm, to_qkv in zip(xs, self.norms, self.to_qkv)]
        lengths = [x.shape[1] for x in xs]

        # For key view j the queries of all other views are independent rows of one softmax
        # problem each, so they are stacked into one longer query sequence: V kernel calls
        # instead of V*(V-1), each one larger (on CPU ~15% faster forward + backward for the
        # paper's 197/393/589-token views).
        pair_out: dict[tuple[int, int], torch.Tensor] = {}
        for j in range(n_views):
            queries = [i for i in range(n_views) if i != j]
            q = torch.cat([qkv[i][0] for i in queries], dim=2)
            o = merge_heads(F.scaled_dot_product_attention(q, qkv[j][1], qkv[j][2], dropout_p=p))
            for i, o_ij in zip(queries, o.split([lengths[i] for i in queries], dim=1)):
                pair_out[i, j] = o_ij

        out = []
        for i, (x, to_out) in enumerate(zip(xs, self.to_out)):
            others = [pair_out[i, j] for j in range(n_views) if j != i]
            # scaling the column blocks of the projection by w_ij is the same as scaling the
            # A_ij, on a (dim x (V-1)*dim) matrix instead of on every token
            w = self.pair_weights[i].repeat_interleave(x.shape[-1])
            y = F.linear(torch.cat(others, dim=-1), to_out.weight * w, to_out.bias)
            out.append(x + self.out_drop(y))
        return out
