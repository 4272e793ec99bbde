"""Tests of the M2OST network: shapes, token counts, size, gradients, masking, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2ost.model import M2OST, VARIANTS, build_model, count_flops, count_parameters
from m2ost.model.attention import CrossLevelTokenMixing, IntraLevelTokenMixing
from m2ost.model.embedding import DeformablePatchEmbedding, plan_scales

# a model small enough to run in milliseconds: 32 px views, patch 8 -> 16 tokens per scale
SMALL = dict(img_size=32, patch_size=8, depth=2, dim=24, heads=3, mlp_dim=12)


def small_model(n_views: int = 3, n_genes: int = 7, **kw) -> M2OST:
    torch.manual_seed(0)
    sizes = {**SMALL, **kw}
    # per-view sizes fixed, totals scaled with the number of views
    sizes.update(dim=8 * n_views, heads=n_views, mlp_dim=4 * n_views)
    sizes.update(kw)
    return M2OST(n_genes=n_genes, n_views=n_views, **sizes)


def views(batch: int, n_views: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, n_views, 3, size, size)


@pytest.mark.parametrize("n_views", [1, 2, 3])
def test_output_shape(n_views):
    model = small_model(n_views)
    out = model(views(2, n_views))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_single_view_has_no_cross_level_mixers():
    model = small_model(1)
    assert not any(isinstance(m, CrossLevelTokenMixing) for m in model.modules())


def test_rejects_wrong_input_shape():
    model = small_model(3)
    with pytest.raises(ValueError, match="expected input"):
        model(views(2, 2))


def test_token_counts_paper_geometry():
    embed = DeformablePatchEmbedding(n_views=3, img_size=224, patch_size=16, dim=8, hidden_dim=8)
    assert embed.tokens_per_view == [196, 392, 588]
    tokens = embed(torch.randn(1, 3, 3, 224, 224))
    assert [t.shape[1] for t in tokens] == [197, 393, 589]  # + [cls]


def test_centre_crops_are_exact():
    scales = plan_scales(224, 16, 3)
    assert [(s.patch, s.crop, s.start) for s in scales] == [(16, 224, 0), (8, 112, 56), (4, 56, 84)]
    # the released code's scale-2 crop (84:168) gave 441 tokens; here every scale gives 196
    assert [s.n_tokens for s in scales] == [196, 196, 196]


def test_fine_scales_see_only_the_centre():
    embed = DeformablePatchEmbedding(n_views=3, img_size=32, patch_size=8, dim=4, hidden_dim=8)
    base = torch.randn(1, 3, 3, 32, 32)
    changed = base.clone()
    changed[..., :8, :] = torch.randn(1, 3, 3, 8, 32)  # top quarter: outside every centre crop
    a, b = embed(base), embed(changed)
    n = 16  # tokens per scale
    # view 2: scale-0 tokens change, scale-1 (central half) and scale-2 (central quarter) do not
    assert not torch.allclose(a[2][:, 1:1 + n], b[2][:, 1:1 + n])
    assert torch.allclose(a[2][:, 1 + n:], b[2][:, 1 + n:])


def test_more_views_than_scales_reuse_the_finest():
    assert len(plan_scales(224, 16, 8)) == 5  # patch 16 / 8 / 4 / 2 / 1
    embed = DeformablePatchEmbedding(n_views=6, img_size=224, patch_size=16, dim=4, hidden_dim=8)
    assert embed.tokens_per_view == [196, 392, 588, 784, 980, 980]


def test_paper_parameter_count():
    model = build_model({"variant": "paper"}, n_genes=250, n_views=3, img_size=224)
    n = count_parameters(model)
    assert abs(n - 7.0e6) / 7.0e6 < 0.05, n
    assert model.tokens_per_view == [196, 392, 588]


def test_paper_macs():
    model = build_model({"variant": "paper"}, n_genes=250, n_views=3, img_size=224)
    macs = count_flops(model, 3, 224)
    # authors' code: 2.17 GMACs in linear layers, 4.31 GMACs with the attention products
    assert abs(macs["linear"] - 2.17e9) / 2.17e9 < 0.02
    assert abs(macs["total"] - 4.31e9) / 4.31e9 < 0.02
    n = [197, 393, 589]
    intra = sum(2 * k * k * 192 for k in n)
    cross = sum(2 * n[i] * n[j] * 192 for i in range(3) for j in range(3) if i != j)
    assert macs["attention"] == 4 * (intra + cross)


def test_gradients_reach_every_parameter():
    model = small_model(3)
    model.train()
    F.mse_loss(model(views(3, 3)), torch.randn(3, 7)).backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    # every kind of block is covered
    names = {name.split(".")[2] for name, _ in model.named_parameters()
             if name.startswith("blocks.")}
    assert names == {"intra", "ffn", "cross", "channel"}


def test_cross_level_mixing_matches_pairwise_definition():
    torch.manual_seed(0)
    mix = CrossLevelTokenMixing(n_views=3, dim=8, heads=2).eval()
    with torch.no_grad():
        mix.pair_weights.copy_(torch.rand(3, 2) + 0.5)
    xs = [torch.randn(2, n, 8) for n in (5, 9, 13)]
    out = mix(xs)
    for i in range(3):
        parts = []
        for m, j in enumerate(j for j in range(3) if j != i):
            q = mix.to_qkv[i](mix.norms[i](xs[i])).chunk(3, -1)[0]
            k, v = mix.to_qkv[j](mix.norms[j](xs[j])).chunk(3, -1)[1:]
            heads = lambda t: t.unflatten(-1, (2, 4)).transpose(1, 2)  # noqa: E731
            a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, -1) @ heads(v)
            parts.append(mix.pair_weights[i, m] * a.transpose(1, 2).flatten(2))
        expected = xs[i] + mix.to_out[i](torch.cat(parts, -1))
        assert out[i].shape == xs[i].shape
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_token_masking_only_in_training():
    model = small_model(3, token_mask_ratio=0.5)
    itmm = next(m for m in model.modules() if isinstance(m, IntraLevelTokenMixing))
    x = torch.randn(4, 17, 8)  # [cls] + 16 patch tokens

    model.eval()
    assert itmm.key_mask(x) is None
    model.train()
    mask = itmm.key_mask(x)
    assert mask.shape == (4, 1, 1, 17)
    assert mask[..., 0].all()  # [cls] never masked
    assert (~mask).sum(-1).flatten().tolist() == [8] * 4  # exactly half of the patch tokens

    # with dropout 0 the mask is the only randomness: train passes differ, eval passes do not
    inp = views(2, 3)
    assert not torch.equal(model(inp), model(inp))
    model.eval()
    assert torch.equal(model(inp), model(inp))


def test_eval_is_deterministic():
    model = small_model(3, dropout=0.3, token_mask_ratio=0.25).eval()
    inp = views(2, 3)
    with torch.no_grad():
        assert torch.equal(model(inp), model(inp))


def test_build_model_variants_and_errors():
    for name in VARIANTS:
        assert name in {"tiny", "small", "paper", "d6", "d8", "d12"}
    model = build_model({"variant": "tiny"}, n_genes=5, n_views=2, img_size=224)
    assert model.n_views == 2 and model.head.out_features == 5
    with pytest.raises(ValueError, match="unknown model variant"):
        build_model({"variant": "huge"}, 5, 3, 224)
    with pytest.raises(ValueError, match="unknown model option"):
        build_model({"variant": "tiny", "width": 3}, 5, 3, 224)
    with pytest.raises(ValueError, match="not divisible by per-view heads"):
        build_model({"variant": "tiny", "heads": 9, "dim": 96}, 5, 3, 224)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model({"variant": "tiny"}, 5, 3, 100)


def test_variant_overrides():
    model = build_model({"variant": "paper", "depth": 2, "dropout": 0.1}, 250, 3, 224)
    assert len(model.blocks) == 2
    assert count_parameters(model) < count_parameters(
        build_model({"variant": "paper"}, 250, 3, 224))


def test_patch_mlp_folded_affine_matches_plain_layers():
    from einops import rearrange

    from m2ost.model.embedding import PatchMLP

    torch.manual_seed(0)
    mlp = PatchMLP(patch=8, hidden=16, dim=8)
    with torch.no_grad():
        mlp.net[0].weight.uniform_(0.5, 1.5)
        mlp.net[0].bias.normal_()
    img = torch.randn(2, 3, 3, 32, 32)
    patches = rearrange(img, "b v c (h p1) (w p2) -> b v (h w) (c p1 p2)", p1=8, p2=8)
    assert torch.allclose(mlp(img), mlp.net(patches), atol=1e-5)
