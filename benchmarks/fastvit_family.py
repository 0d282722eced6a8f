"""FastViT family on CPU: the toolkit's encoders against the same timm models called directly.

For each encoder and resolution, both run the same weights on the same pixels, alternating in one process;
the script checks the outputs agree and prints medians and the ratio toolkit / timm (about 1.00 expected).

    python benchmarks/fastvit_family.py --sizes 256 512 --repeats 5
"""

from __future__ import annotations

import argparse
from statistics import median

import timm
import torch
from alternate import alternate

from ablate.api.components import StageContext
from ablate.api.registry import get_registry

TIMM_NAMES = {"fastvithd": "fastvit_mci3", "fastvit-mci2": "fastvit_mci2", "fastvit-mci4": "fastvit_mci4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["fastvit-mci2", "fastvithd"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 768])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    registry = get_registry()
    print(f"{'encoder':14} {'px':>5} {'tokens':>7} {'timm ms':>10} {'ablate ms':>10} {'ratio':>6}")
    for name in args.encoders:
        cls = registry.get("encoder", name)
        for size in args.sizes:
            torch.manual_seed(0)
            ours = cls(cls.Config(name=name, image_size=size)).eval()
            reference = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0, inference_mode=True)
            reference.load_state_dict(ours.model.state_dict())
            reference.eval()
            pixels = torch.rand(1, 3, size, size)
            ctx = StageContext(pixel_values=pixels)
            with torch.inference_mode():
                expected = reference.forward_features(pixels).flatten(2).transpose(1, 2)
                assert torch.allclose(ours(ctx).tokens, expected, atol=1e-4), f"{name} at {size} px differs"
                samples = alternate(
                    {
                        "timm": lambda reference=reference, pixels=pixels: reference.forward_features(pixels),
                        "ablate": lambda ours=ours, ctx=ctx: ours(ctx),
                    },
                    repeats=args.repeats,
                )
            direct, toolkit = median(samples["timm"]), median(samples["ablate"])
            print(f"{name:14} {size:5d} {ours.num_tokens():7d} {direct:10.1f} {toolkit:10.1f} {toolkit / direct:6.3f}")


if __name__ == "__main__":
    main()
