"""Print the size and cost of every model variant: ``m2ost model-info``."""

from __future__ import annotations

import argparse

from .flops import count_flops, count_parameters
from .variants import VARIANTS, build_model


def print_variants(views: int = 3, img_size: int = 224, genes: int = 250) -> None:
    """One line per variant: sizes, parameters, multiply-accumulates, tokens per view."""
    args = argparse.Namespace(views=views, img_size=img_size, genes=genes)
    print(f"{args.views} views of {args.img_size} px, {args.genes} genes; "
          "GMACs = multiply-accumulates of one forward pass of one spot")
    header = (f"{'variant':8s} {'depth':>5s} {'dim':>5s} {'heads':>5s} {'mlp':>5s} {'patch':>5s} "
              f"{'params (M)':>10s} {'GMACs linear':>12s} {'GMACs +attn':>12s}  tokens per view")
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        model = build_model({"variant": name}, args.genes, args.views, args.img_size)
        macs = count_flops(model, args.views, args.img_size)
        blk = model.blocks[0].intra
        dim = model.head.in_features
        heads = blk.heads * args.views
        mlp = model.blocks[0].ffn.net[1].out_features * args.views
        patch = model.embed.scales[0].patch
        print(f"{name:8s} {len(model.blocks):5d} {dim:5d} {heads:5d} {mlp:5d} {patch:5d} "
              f"{count_parameters(model) / 1e6:10.3f} {macs['linear'] / 1e9:12.3f} "
              f"{macs['total'] / 1e9:12.3f}  {'/'.join(map(str, model.tokens_per_view))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--genes", type=int, default=250)
    a = parser.parse_args()
    print_variants(a.views, a.img_size, a.genes)
