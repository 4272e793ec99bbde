"""M2OST over pretrained tokens: the views are tokenised by an image encoder's feature map.

The paper's Deformable Patch Embedding cuts every view into pixel patches and embeds them with
MLPs trained from scratch. Here each view arrives already tokenised: the encoder's feature map
of the view, a grid of ``h x w`` tokens of ``C`` channels (cached, or computed by a partly
fine-tuned encoder, :class:`EncoderTokenM2OST`).

Deformable idea. All views are centred on the spot and view ``j < i`` has the smaller field of
view, so view ``j`` *is* the centre of view ``i`` seen at a finer scale. View ``i`` therefore
gets its own grid plus the grids of the finer views ``i-1 .. 0``: ``N, 2N, 3N`` tokens for three
views, as the paper's ``L, 2L, 3L``, the spot area tokenised finely at every level, at no extra
encoder cost. Each view has its own [cls] token and learnable position embedding (which also
tells apart which scale a token comes from).

Layout::

    tokens (B, V, N, C)
      -> LayerNorm + Linear(C, d)  (shared by the views), deformable concatenation, [cls], pos
      -> depth x M2OSTBlock  (ITMM, shared FFN, CTMM, CCMM: m2ost.model.m2ost)
      -> LayerNorm of each view's [cls], concatenated (B, V * d) -> Dropout -> Linear -> genes
"""

from __future__ import annotations

import torch
from torch import nn

from .m2ost import M2OSTBlock


class TokenM2OST(nn.Module):
    """M2OST blocks over encoder tokens.

    Parameters
    ----------
    n_genes : int
        Output size.
    n_views : int
        Number of views V (view 0 the finest field of view).
    n_tokens : int
        Tokens of one view's encoder grid (``h * w``).
    in_dim : int
        Channels ``C`` of the encoder tokens.
    depth, dim, heads, mlp_dim : int
        Number of M2OST blocks; token width, attention heads and CCMM hidden width *per view*
        (the shared FFN is ``mlp_dim`` wide too).
    deformable : bool
        Add the finer views' tokens to every coarser view (see the module docstring).
    token_mask_ratio : float
        Fraction of tokens hidden from the intra-level attention in training.
    dropout : float
        Dropout in the blocks and before the head.
    """

    def __init__(self, n_genes: int, n_views: int, n_tokens: int, in_dim: int, depth: int = 2,
                 dim: int = 64, heads: int = 2, mlp_dim: int = 128, deformable: bool = True,
                 token_mask_ratio: float = 0.0, dropout: float = 0.0):
        super().__init__()
        for name, value in [("n_genes", n_genes), ("n_views", n_views), ("n_tokens", n_tokens),
                            ("in_dim", in_dim), ("depth", depth), ("dim", dim), ("heads", heads),
                            ("mlp_dim", mlp_dim)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if not 0.0 <= token_mask_ratio < 1.0 or not 0.0 <= dropout < 1.0:
            raise ValueError("token_mask_ratio and dropout must be in [0, 1)")
        self.n_views, self.n_tokens, self.in_dim = n_views, n_tokens, in_dim
        self.deformable = deformable
        self.embed = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
        self.tokens_per_view = [n_tokens * (i + 1 if deformable else 1) for i in range(n_views)]
        self.cls_tokens = nn.Parameter(torch.randn(n_views, dim) * 0.02)
        self.pos_embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(1, n + 1, dim) * 0.02) for n in self.tokens_per_view)
        self.blocks = nn.ModuleList(
            M2OSTBlock(n_views, dim, heads, mlp_dim, mlp_dim * n_views, dropout,
                       token_mask_ratio) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_views))
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(n_views * dim, n_genes)

    def view_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, V, N, C) encoder tokens -> V sequences (B, 1 + N_i, dim), [cls] first."""
        if tokens.ndim != 4 or tokens.shape[1:] != (self.n_views, self.n_tokens, self.in_dim):
            raise ValueError(f"expected tokens (B, {self.n_views}, {self.n_tokens}, "
                             f"{self.in_dim}), got {tuple(tokens.shape)}")
        b = tokens.shape[0]
        x = self.embed(tokens.to(self.head.weight.dtype))  # one product for every view
        views = []
        for i in range(self.n_views):
            # own grid first, then the finer views from the nearest to the finest
            parts = [x[:, j] for j in range(i, -1, -1)] if self.deformable else [x[:, i]]
            cls = self.cls_tokens[i].expand(b, 1, -1)
            views.append(torch.cat([cls, *parts], dim=1) + self.pos_embeddings[i])
        return views

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, V, N, C) encoder tokens -> (B, n_genes)."""
        xs = self.view_tokens(tokens)
        for block in self.blocks:
            xs = block(xs)
        cls = torch.cat([norm(t[:, 0]) for norm, t in zip(self.norms, xs)], dim=-1)
        return self.head(self.head_drop(cls))


def unfreeze_last_blocks(backbone: nn.Module, n_blocks: int) -> list[str]:
    """Freeze ``backbone`` except its last ``n_blocks`` stages (and what follows them).

    Works on timm CNNs and ViTs, whose stages are ``backbone.blocks``; the layers after the last
    stage (``conv_head``, ``bn2``, ``norm``) train with it. Returns the names of the trainable
    parameters (empty when ``n_blocks`` is 0).
    """
    for p in backbone.parameters():
        p.requires_grad_(False)
    if n_blocks <= 0:
        return []
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"cannot fine-tune {type(backbone).__name__}: it has no 'blocks' "
                         "sequence of stages")
    chosen = [f"blocks.{i}." for i in range(max(0, len(blocks) - n_blocks), len(blocks))]
    after = ("conv_head", "bn2", "norm.", "fc_norm")
    names = []
    for name, p in backbone.named_parameters():
        if name.startswith(tuple(chosen)) or name.startswith(after):
            p.requires_grad_(True)
            names.append(name)
    return names


class EncoderTokenM2OST(nn.Module):
    """An image encoder, partly fine-tuned, feeding :class:`TokenM2OST`.

    ``backbone.forward_features`` (the timm convention) maps normalised images (B, 3, H, W) to a
    feature map, (B, C, h, w) for CNNs or (B, n_prefix + h*w, C) for ViTs (``n_prefix`` leading
    [cls]/register tokens are dropped). The frozen part runs without gradients.

    The views arrive normalised for the M2OST networks (``in_mean``/``in_std``, m2ost.learn.inputs.augment);
    they are renormalised for the encoder (``enc_mean``/``enc_std``, its own statistics) and resized
    to its ``input_px``, as the embed stage prepares them, so the untrained network sees exactly
    the tokens the frozen encoder caches. The backbone's batch norms keep their pretrained
    statistics (eval mode) in training too: batches of a few dozen spots from a few slides would
    give noisy ones, and the frozen stages must not drift; the affine weights of the unfrozen
    stages still train.
    """

    def __init__(self, backbone: nn.Module, head: TokenM2OST, finetune_blocks: int = 0,
                 n_prefix_tokens: int = 0, input_px: int | None = None,
                 in_mean=(0.0, 0.0, 0.0), in_std=(1.0, 1.0, 1.0),
                 enc_mean=(0.0, 0.0, 0.0), enc_std=(1.0, 1.0, 1.0), encoder_lr_scale: float = 1.0):
        super().__init__()
        self.backbone, self.net = backbone, head
        self.encoder_lr_scale = encoder_lr_scale  # the optimiser's rate for the backbone (m2ost.learn.training.network)
        self.n_prefix_tokens, self.input_px = n_prefix_tokens, input_px
        self.trainable = unfreeze_last_blocks(backbone, finetune_blocks)
        # x_encoder = (x * in_std + in_mean - enc_mean) / enc_std, per channel
        scale = torch.tensor(in_std, dtype=torch.float32) / torch.tensor(enc_std, dtype=torch.float32)
        shift = (torch.tensor(in_mean, dtype=torch.float32) - torch.tensor(enc_mean, dtype=torch.float32)) \
            / torch.tensor(enc_std, dtype=torch.float32)
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        backbone.eval()

    @property
    def head(self) -> nn.Linear:
        """The output layer (the trainer starts its bias at the mean expression)."""
        return self.net.head

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # pretrained batch-norm statistics (class docstring)
        return self

    def encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B*V, 3, H, W) views as normalised for M2OST -> the encoder's input."""
        x = images * self.in_scale + self.in_shift
        size = self.input_px
        if size and tuple(x.shape[-2:]) != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)
        return x

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W) -> (B, V, N, C)."""
        b, v = images.shape[:2]
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.trainable)):
            f = self.backbone.forward_features(self.encoder_input(images.flatten(0, 1)))
        if f.ndim == 4:  # CNN: (BV, C, h, w)
            f = f.flatten(2).transpose(1, 2)
        else:            # ViT: (BV, prefix + N, C)
            f = f[:, self.n_prefix_tokens:]
        return f.reshape(b, v, f.shape[1], f.shape[2])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.tokens(images))
