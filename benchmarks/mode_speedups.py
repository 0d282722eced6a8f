"""Each execution mode (and dtype, memory format) against eager float32, per system, side by side in one process.

The baseline is eager float32: the toolkit's (`--baseline eager`, any preset) or FastVLM hand-written against timm +
transformers (`--baseline hand`, the reference of the issue's CPU targets). Each variant is a copy of the baseline's
weights, converted and prepared as `ablate run --mode M --dtype D --memory-format F` would, then timed in
alternation with the baseline (one variant at a time, freed after, so memory holds two models at most). The
speed-up is the median of per-round ratios baseline / variant; the relative logit difference to the baseline says
what each variant costs in accuracy.

    python benchmarks/mode_speedups.py --preset fastvlm-0.5b --image-size 512 \\
        --variants eager:float32:contiguous compile:float32:channels_last compile:bfloat16:channels_last
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc

import torch
from alternate import alternate
from hand import hand_written
from report import paired_ratio, parse_args, timing, write_json

import ablate
from ablate.config.run_options import RunOptions
from ablate.measurement.modes import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fastvlm-0.5b")
    parser.add_argument("--image-size", type=int, default=None, help="encoder.image_size (default: the preset's)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--baseline", choices=["eager", "hand"], default="eager")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["compile:float32:contiguous", "compile:float32:channels_last", "eager:bfloat16:channels_last"],
        help="MODE:DTYPE:MEMORY_FORMAT each",
    )
    parser.add_argument("--overrides", nargs="*", default=[], help="extra config overrides (key=value)")
    args = parse_args(parser, "mode_speedups")

    torch.manual_seed(0)
    overrides = list(args.overrides) + ([f"encoder.image_size={args.image_size}"] if args.image_size else [])
    base = ablate.build(args.preset, overrides, device=args.device)
    size = base.config.encoder.image_size
    ids = base.make_prompt(args.prompt_tokens)
    pixels = torch.rand(1, 3, size, size, device=args.device)
    if args.baseline == "hand":
        baseline = hand_written(base, torch.float32, "contiguous", "eager", pixels, ids, share=True)
    else:
        eager = prepare(base, base.start(pixels, ids), RunOptions(device=args.device))
        baseline = lambda: eager.ttft(eager.ctx)  # noqa: E731
    with torch.inference_mode():
        reference = baseline().float()

    results = []
    print(f"{args.preset} at {size} px, baseline: {args.baseline} float32, {torch.get_num_threads()} threads")
    for spec in args.variants:
        mode, dtype, memory_format = spec.split(":")
        vlm = copy.deepcopy(base).to(getattr(torch, dtype))
        options = RunOptions(device=args.device, dtype=dtype, mode=mode, memory_format=memory_format)
        execution = prepare(vlm, vlm.start(pixels.to(getattr(torch, dtype)), ids), options)
        with torch.inference_mode():
            logits = execution.ttft(execution.ctx).float()
            difference = ((logits - reference).abs().max() / reference.abs().max()).item()
            samples = alternate(
                {"baseline": baseline, "variant": lambda execution=execution: execution.ttft(execution.ctx)},
                repeats=args.repeats,
                clock=args.clock,
            )
        row = {
            "variant": spec,
            "used": dataclasses.asdict(execution.entry.used),
            "fallbacks": execution.entry.fallbacks,
            "setup_s": execution.entry.setup_s,
            "relative_logit_difference": difference,
            "baseline": timing(samples["baseline"]),
            "variant_timing": timing(samples["variant"]),
            "speedup": paired_ratio(samples["baseline"], samples["variant"]),
        }
        results.append(row)
        speedup = row["speedup"]
        print(
            f"  {spec:32} {row['variant_timing']['median_ms']:9.1f} ms vs {row['baseline']['median_ms']:9.1f} ms  "
            f"speed-up {speedup['median']:.2f}x (IQR {speedup['iqr']:.2f}, range {speedup['min']:.2f}-"
            f"{speedup['max']:.2f})  logits differ by {difference:.1e}"
            + (f"  [{'; '.join(row['fallbacks'])}]" if row["fallbacks"] else ""),
            flush=True,
        )
        del vlm, execution
        gc.collect()
    write_json(args.json, "mode_speedups", args, results)


if __name__ == "__main__":
    main()
