"""Encoder latency against resolution, with the fitted growth exponent (latency ~ pixels_per_side ** k).

One encoder per resolution (the same weights: built from the same seed), each prepared in the chosen mode as
`ablate run` prepares it, all timed in alternation in one process so that machine noise hits every size alike.
The exponent is a least-squares fit of log(ms) on log(side); the FLOPs exponent (counted on the meta device) is
fitted the same way, so the two can be compared: a latency exponent below the FLOPs one means small inputs
under-use the device (fixed overheads), above it means large inputs fall out of the caches.

    python benchmarks/encoder_scaling.py --preset fastvlm-0.5b --sizes 256 512 768 1024 --mode eager
"""

from __future__ import annotations

import argparse
import math

import torch
from alternate import alternate
from report import parse_args, timing, write_json

import ablate
from ablate.config.run_options import RunOptions
from ablate.measurement.modes import prepare


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of log(y) against log(x), least squares."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fastvlm-0.5b")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 768, 1024])
    parser.add_argument("--mode", default="eager", choices=["eager", "compile", "cudagraph"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"])
    args = parse_args(parser, "encoder_scaling")

    options = RunOptions(device=args.device, dtype=args.dtype, mode=args.mode, memory_format=args.memory_format)
    candidates, flops, tokens, used = {}, {}, {}, {}
    for size in args.sizes:
        # A tiny LLM: only the encoder stage is timed, and the model is built (and compiled) once per size.
        overrides = [f"encoder.image_size={size}", "decoder.arch=qwen2-tiny", f"run.dtype={args.dtype}"]
        record = ablate.measure(args.preset, overrides, count_only=True).to_dict()
        flops[size], tokens[size] = record["flops"]["encoder"], record["tokens"]["encoder"]
        torch.manual_seed(0)
        vlm = ablate.build(args.preset, overrides, device=args.device)
        pixels = torch.rand(1, 3, size, size, device=args.device, dtype=getattr(torch, args.dtype))
        execution = prepare(vlm, vlm.start(pixels, vlm.make_prompt(4)), options)
        (name, encode), *_ = execution.stages
        assert name == "encoder"
        candidates[size] = lambda encode=encode, ctx=execution.ctx: encode(ctx)
        used[size] = execution.entry.used.mode
        print(f"prepared {size} px ({used[size]})", flush=True)
    with torch.inference_mode():
        samples = alternate(candidates, repeats=args.repeats, clock=args.clock)

    rows = []
    print(f"{'px':>6} {'tokens':>7} {'GFLOPs':>9} {'median ms':>10} {'IQR ms':>8} {'GFLOP/s':>8}")
    for size in args.sizes:
        row = {"image_size": size, "tokens": tokens[size], "flops": flops[size], **timing(samples[size])}
        row["gflops_per_s"] = flops[size] / 1e9 / (row["median_ms"] / 1e3)
        rows.append(row)
        print(
            f"{size:6d} {tokens[size]:7d} {flops[size] / 1e9:9.1f} {row['median_ms']:10.1f} {row['iqr_ms']:8.1f} "
            f"{row['gflops_per_s']:8.1f}"
        )
    sizes = [float(s) for s in args.sizes]
    latency_exponent = fit_exponent(sizes, [row["median_ms"] for row in rows])
    flops_exponent = fit_exponent(sizes, [float(flops[s]) for s in args.sizes])
    print(
        f"latency ~ side^{latency_exponent:.2f}, FLOPs ~ side^{flops_exponent:.2f} ({args.preset} encoder, "
        f"{args.mode} {args.dtype} {args.memory_format}, {torch.get_num_threads()} threads)"
    )
    write_json(
        args.json,
        "encoder_scaling",
        args,
        {"rows": rows, "latency_exponent": latency_exponent, "flops_exponent": flops_exponent, "used": used},
    )


if __name__ == "__main__":
    main()
