"""M2OST over pretrained tokens: shapes, the deformable centre tokens, fine-tuning switch."""

from __future__ import annotations

import pytest
import torch

from m2ost.model.token_m2ost import EncoderTokenM2OST, TokenM2OST, unfreeze_last_blocks


def test_tokens_per_view_and_output_shape():
    net = TokenM2OST(n_genes=7, n_views=3, n_tokens=16, in_dim=40, depth=2, dim=32, heads=2)
    assert net.tokens_per_view == [16, 32, 48]  # N, 2N, 3N as the paper's L, 2L, 3L
    x = torch.randn(5, 3, 16, 40)
    seqs = net.view_tokens(x)
    assert [s.shape for s in seqs] == [(5, 17, 32), (5, 33, 32), (5, 49, 32)]
    assert net(x).shape == (5, 7)
    flat = TokenM2OST(n_genes=7, n_views=3, n_tokens=16, in_dim=40, deformable=False)
    assert flat.tokens_per_view == [16, 16, 16]
    with pytest.raises(ValueError, match="expected tokens"):
        net(torch.randn(5, 2, 16, 40))


def test_coarse_views_hold_the_finer_views_tokens():
    """View 2's sequence = [cls], its own grid, then view 1's and view 0's grids (centre, finer)."""
    net = TokenM2OST(n_genes=3, n_views=3, n_tokens=4, in_dim=8, dim=16, heads=2)
    with torch.no_grad():
        for p in net.pos_embeddings:
            p.zero_()
    x = torch.randn(2, 3, 4, 8)
    emb = net.embed(x)
    seq = net.view_tokens(x)[2]
    torch.testing.assert_close(seq[:, 1:5], emb[:, 2])
    torch.testing.assert_close(seq[:, 5:9], emb[:, 1])
    torch.testing.assert_close(seq[:, 9:13], emb[:, 0])
    # changing only view 0's tokens changes what every view sees
    x2 = x.clone()
    x2[:, 0] += torch.randn(2, 4, 8)  # (a constant shift would vanish in the LayerNorm)
    for a, b in zip(net.view_tokens(x), net.view_tokens(x2)):
        assert not torch.allclose(a, b)


def test_single_view_network():
    net = TokenM2OST(n_genes=4, n_views=1, n_tokens=9, in_dim=12, dim=16, heads=2)
    assert net(torch.randn(3, 1, 9, 12)).shape == (3, 4)


def test_gradients_reach_only_the_unfrozen_encoder_blocks():
    timm = pytest.importorskip("timm")
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    head = TokenM2OST(n_genes=5, n_views=2, n_tokens=4, in_dim=backbone.num_features, dim=16,
                      heads=2)
    model = EncoderTokenM2OST(backbone, head, finetune_blocks=1)
    model.train()
    images = torch.randn(2, 2, 3, 64, 64)  # 64 px -> a 2 x 2 grid at stride 32
    model(images).square().mean().backward()
    last = len(backbone.blocks) - 1
    for name, p in backbone.named_parameters():
        tuned = name.startswith((f"blocks.{last}.", "conv_head", "bn2"))
        assert p.requires_grad == tuned, name
        if tuned and p.ndim > 1:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        if not tuned:
            assert p.grad is None, name
    frozen = EncoderTokenM2OST(timm.create_model("tf_efficientnet_lite0", pretrained=False),
                               TokenM2OST(5, 2, 4, backbone.num_features, dim=16, heads=2))
    frozen.train()
    assert not frozen.backbone.training  # frozen batch-norm statistics stay as loaded
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


def test_unfreeze_needs_stages():
    with pytest.raises(ValueError, match="no 'blocks'"):
        unfreeze_last_blocks(torch.nn.Linear(3, 3), 1)
