"""LLM prefill latency against sequence length (visual + prompt tokens), with the fitted growth exponent.

The toolkit's decoder component, built once, runs a prefill (KV cache written, first token's logits) over
random `inputs_embeds` of each length; all lengths are timed in alternation in one process. In compile mode each
length is its own compiled graph (static shapes, as the toolkit compiles them). FLOPs are counted on the meta
device (attention counted in full, not causal).

    python benchmarks/prefill_scaling.py --arch qwen2-0.5b --tokens 80 128 320 640 1088
"""

from __future__ import annotations

import argparse

import torch
import torch._inductor.config as inductor_config
from alternate import alternate
from encoder_scaling import fit_exponent
from report import parse_args, timing, write_json
from torch.utils.flop_counter import FlopCounterMode

from ablate.api.registry import get_registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2-0.5b")
    parser.add_argument("--tokens", nargs="+", type=int, default=[80, 128, 320, 640])
    parser.add_argument("--mode", default="eager", choices=["eager", "compile"])
    parser.add_argument("--dtype", default="float32")
    args = parse_args(parser, "prefill_scaling")

    cls = get_registry().get("decoder", "hf-causal-lm")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = cls(cls.Config(name="hf-causal-lm", arch=args.arch)).to(dtype)
    decoder = cls(cls.Config(name="hf-causal-lm", arch=args.arch)).to(device=args.device, dtype=dtype).eval()
    run = torch.compile(decoder, dynamic=False) if args.mode == "compile" else decoder
    candidates, flops = {}, {}
    for length in args.tokens:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta(torch.empty(1, length, meta.hidden_size, device="meta", dtype=dtype))
        flops[length] = counter.get_total_flops()
        embeds = torch.randn(1, length, decoder.hidden_size, device=args.device, dtype=dtype)
        with torch.inference_mode(), inductor_config.patch(freezing=args.device == "cpu"):
            run(embeds)  # compiles this length now (compile mode)
        candidates[length] = lambda embeds=embeds: run(embeds).logits
    with torch.inference_mode():
        samples = alternate(candidates, repeats=args.repeats, clock=args.clock)

    rows = []
    print(f"{'tokens':>7} {'GFLOPs':>9} {'median ms':>10} {'IQR ms':>8} {'GFLOP/s':>8}")
    for length in args.tokens:
        row = {"tokens": length, "flops": flops[length], **timing(samples[length])}
        row["gflops_per_s"] = flops[length] / 1e9 / (row["median_ms"] / 1e3)
        rows.append(row)
        print(
            f"{length:7d} {flops[length] / 1e9:9.1f} {row['median_ms']:10.1f} {row['iqr_ms']:8.1f} "
            f"{row['gflops_per_s']:8.1f}"
        )
    exponent = fit_exponent([float(t) for t in args.tokens], [row["median_ms"] for row in rows])
    flops_exponent = fit_exponent([float(t) for t in args.tokens], [float(flops[t]) for t in args.tokens])
    print(
        f"latency ~ tokens^{exponent:.2f}, FLOPs ~ tokens^{flops_exponent:.2f} ({args.arch}, {args.mode} {args.dtype}, "
        f"{torch.get_num_threads()} threads)"
    )
    write_json(
        args.json,
        "prefill_scaling",
        args,
        {"rows": rows, "latency_exponent": exponent, "flops_exponent": flops_exponent},
    )


if __name__ == "__main__":
    main()
