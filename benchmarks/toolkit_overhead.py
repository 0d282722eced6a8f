"""Does the toolkit add overhead? FastVLM TTFT by hand (timm + transformers) vs through `ablate`, in each mode.

For each mode, both paths hold the same weights in the same dtype and memory format and run the same pixels and
prompt, alternating in one process. The script checks that their logits agree, then reports medians, spreads and
the per-round ratio toolkit / hand (target: <= 1.03 in every mode). The toolkit runs as `ablate run` does
(ablate.measurement.modes.prepare); the hand-written path compiles or graph-captures its whole TTFT function at once.

    python benchmarks/toolkit_overhead.py --image-size 512 --modes eager compile --repeats 10
    python benchmarks/toolkit_overhead.py --image-size 1024 --device cuda --dtype bfloat16 --modes cudagraph --clock cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import torch
from alternate import alternate
from hand import hand_written
from report import paired_ratio, parse_args, timing, write_json

import ablate
from ablate.config.run_options import DTYPES, RunOptions
from ablate.measurement.modes import prepare


def compare(
    preset: str,
    image_size: int,
    mode: str,
    *,
    prompt_tokens: int = 64,
    dtype: str = "float32",
    memory_format: str = "contiguous",
    device: str = "cpu",
    repeats: int = 10,
    clock: str = "wall",
) -> dict:
    """One mode: the toolkit's TTFT and the hand-written one, alternating, and whether their logits agree."""
    torch.manual_seed(0)
    overrides = [f"encoder.image_size={image_size}", f"run.dtype={dtype}"]
    vlm = ablate.build(preset, overrides, device=device)
    ids = vlm.make_prompt(prompt_tokens)
    pixels = torch.rand(1, 3, image_size, image_size, device=device)
    options = RunOptions(device=device, dtype=dtype, mode=mode, memory_format=memory_format)
    # The toolkit first: prepare() starts torch.compile afresh (torch._dynamo.reset), which would drop the hand
    # path's compiled code if that were compiled before.
    execution = prepare(vlm, vlm.start(pixels.to(DTYPES[dtype]), ids), options)
    by_hand = hand_written(vlm, DTYPES[dtype], memory_format, mode, pixels, ids)
    with torch.inference_mode():
        toolkit_logits, hand_logits = execution.ttft(execution.ctx).float(), by_hand().float()
        difference = ((toolkit_logits - hand_logits).abs().max() / hand_logits.abs().max()).item()
        samples = alternate(
            {"hand": by_hand, "toolkit": lambda execution=execution: execution.ttft(execution.ctx)},
            repeats=repeats,
            clock=clock,
        )
    row = {
        "mode": mode,
        "used": dataclasses.asdict(execution.entry.used),
        "stages": execution.entry.stages,
        "ttft_path": execution.entry.ttft,
        "fallbacks": execution.entry.fallbacks,
        "relative_logit_difference": difference,
        "logits_agree": difference < (1e-4 if dtype == "float32" else 3e-2),
        "clock": clock,
        "hand": timing(samples["hand"]),
        "toolkit": timing(samples["toolkit"]),
        "toolkit_over_hand": paired_ratio(samples["toolkit"], samples["hand"]),
    }
    del vlm, by_hand, execution
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fastvlm-0.5b")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile", "cudagraph"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"])
    args = parse_args(parser, "toolkit_overhead", repeats=10)

    results = []
    for mode in args.modes:
        row = compare(
            args.preset,
            args.image_size,
            mode,
            prompt_tokens=args.prompt_tokens,
            dtype=args.dtype,
            memory_format=args.memory_format,
            device=args.device,
            repeats=args.repeats,
            clock=args.clock,
        )
        assert row["logits_agree"], f"{mode}: paths disagree ({row['relative_logit_difference']})"
        results.append(row)
        ratio = row["toolkit_over_hand"]
        print(
            f"{mode:9} hand {row['hand']['median_ms']:9.1f} ms  toolkit {row['toolkit']['median_ms']:9.1f} ms  "
            f"toolkit/hand {ratio['median']:.3f} (IQR {ratio['iqr']:.3f}, range {ratio['min']:.3f}-{ratio['max']:.3f}; "
            f"of minima {row['toolkit']['min_ms'] / row['hand']['min_ms']:.3f})"
            f"  logits differ by {row['relative_logit_difference']:.1e} (relative)  [target <= 1.03]",
            flush=True,
        )
    print(
        f"{args.preset} at {args.image_size} px, {args.dtype}, {args.memory_format}, {torch.get_num_threads()} "
        f"threads, {args.repeats} alternating rounds, {args.clock} clock"
    )
    write_json(args.json, "toolkit_overhead", args, results)


if __name__ == "__main__":
    main()
