"""M2OST: many-to-one regression of a spot's expression from V views of the same place.

Wang et al., "M2OST: Many-to-one Regression for Predicting Spatial Transcriptomics from Digital
Pathology Images", AAAI 2025. docs/ARCHITECTURE.md says where this network sits in the
workflow; the docstrings of the submodules (embedding, attention) note where it departs from the released code.

Layout::

    views (B, V, 3, H, W)
      -> DeformablePatchEmbedding         V token sequences (B, 1 + N_i, d), [cls] first
      -> depth x M2OSTBlock:
           ITMM   self-attention per view              (separate weights per view)
           FFN    token-wise MLP                       (weights shared by the views)
           CTMM   attention from each view to the others
           CCMM   squeeze-excitation across the views
      -> LayerNorm of each view's [cls], concatenated (B, V * d) -> Linear -> (B, n_genes)
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossLevelTokenMixing, IntraLevelTokenMixing
from .channel import CrossLevelChannelMixing, FeedForward
from .embedding import DeformablePatchEmbedding


class M2OSTBlock(nn.Module):
    """ITMM -> shared FFN -> CTMM -> CCMM, each with its residual (cross-level ones need V >= 2)."""

    def __init__(
        self,
        n_views: int,
        dim: int,
        heads: int,
        ffn_hidden: int,
        se_hidden: int,
        dropout: float = 0.0,
        token_mask_ratio: float = 0.0,
    ):
        super().__init__()
        self.intra = IntraLevelTokenMixing(n_views, dim, heads, dropout, token_mask_ratio)
        self.ffn = FeedForward(dim, ffn_hidden, dropout)
        # a single view has nothing to mix across: the paper's single-level ablation
        self.cross = CrossLevelTokenMixing(n_views, dim, heads, dropout) if n_views > 1 else None
        self.channel = (CrossLevelChannelMixing(n_views, dim, se_hidden, dropout)
                        if n_views > 1 else None)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = self.ffn(self.intra(xs))
        if self.cross is not None:
            xs = self.channel(self.cross(xs))
        return xs


class M2OST(nn.Module):
    """The M2OST network.

    Sizes are totals over the views, as in the paper: ``dim = 576`` with 3 views means 192
    channels per view, ``heads = 9`` means 3 heads (of 64 channels) per view, ``mlp_dim = 384``
    means a 128-wide shared FFN (384 / 3) and a 384-wide CCMM MLP (over the 576 concatenated
    channels). This split is the one of the authors' code; together with the patch-MLP widths
    (576 / 288 / 144 for patch 16 / 8 / 4) and the CTMM projection over the concatenated
    cross-view outputs it gives 7.05 M parameters for the paper configuration (authors' code
    7.04 M; the paper's 6.81 M is the thop count, which leaves out the position embeddings and
    [cls] tokens, 0.23 M).

    Parameters
    ----------
    n_genes : int
        Size of the predicted expression vector.
    n_views : int
        Number of views V (>= 1). View 0 is the finest field of view.
    img_size : int
        Side of every (square) view in pixels.
    patch_size : int
        Coarsest patch size of the Deformable Patch Embedding.
    depth : int
        Number of M2OST blocks.
    dim : int
        Total token width over the views (must be divisible by ``n_views``).
    heads : int
        Total attention heads over the views (divisible by ``n_views``; the per-view width must
        be divisible by the per-view heads).
    mlp_dim : int
        Hidden width of the CCMM MLP; ``mlp_dim / n_views`` is the shared FFN's hidden width.
    token_mask_ratio : float
        Fraction of patch tokens hidden from the intra-level attention during training.
    dropout : float
        Dropout rate in attention and MLPs.
    """

    def __init__(
        self,
        n_genes: int,
        n_views: int = 3,
        img_size: int = 224,
        patch_size: int = 16,
        depth: int = 4,
        dim: int = 576,
        heads: int = 9,
        mlp_dim: int = 384,
        token_mask_ratio: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_sizes(n_genes, n_views, img_size, patch_size, depth, dim, heads, mlp_dim,
                    token_mask_ratio, dropout)
        self.n_views, self.img_size = n_views, img_size
        view_dim, view_heads = dim // n_views, heads // n_views

        self.embed = DeformablePatchEmbedding(n_views, img_size, patch_size, view_dim,
                                              hidden_dim=dim)
        self.blocks = nn.ModuleList(
            M2OSTBlock(n_views, view_dim, view_heads, mlp_dim // n_views, mlp_dim, dropout,
                       token_mask_ratio)
            for _ in range(depth)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(view_dim) for _ in range(n_views))
        self.head = nn.Linear(dim, n_genes)

    @property
    def tokens_per_view(self) -> list[int]:
        """Patch tokens of each view (without [cls])."""
        return list(self.embed.tokens_per_view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W) normalised views -> (B, n_genes)."""
        if x.ndim != 5 or x.shape[1] != self.n_views or x.shape[-2:] != (self.img_size,) * 2:
            raise ValueError(
                f"expected input (B, {self.n_views}, 3, {self.img_size}, {self.img_size}), "
                f"got {tuple(x.shape)}"
            )
        xs = self.embed(x)
        for block in self.blocks:
            xs = block(xs)
        # only the [cls] tokens are read, so only they are normalised
        cls = torch.cat([norm(t[:, 0]) for norm, t in zip(self.norms, xs)], dim=-1)
        return self.head(cls)


def check_sizes(n_genes, n_views, img_size, patch_size, depth, dim, heads, mlp_dim,
                token_mask_ratio, dropout) -> None:
    """Raise ValueError naming the first inconsistent size."""
    for name, value in [("n_genes", n_genes), ("n_views", n_views), ("img_size", img_size),
                        ("patch_size", patch_size), ("depth", depth), ("dim", dim),
                        ("heads", heads), ("mlp_dim", mlp_dim)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
    for name, value in [("dim", dim), ("heads", heads), ("mlp_dim", mlp_dim)]:
        if value % n_views:
            raise ValueError(
                f"{name}={value} (total over views) is not divisible by n_views={n_views}")
    if (dim // n_views) % (heads // n_views):
        raise ValueError(
            f"per-view width {dim // n_views} is not divisible by per-view heads {heads // n_views}"
        )
    if not 0.0 <= token_mask_ratio < 1.0:
        raise ValueError(f"token_mask_ratio must be in [0, 1), got {token_mask_ratio}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
