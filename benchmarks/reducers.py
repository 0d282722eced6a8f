"""Token reducers on FastViTHD@1024 vs CLIP ViT-L/14@336 (LLaVA-1.5's block-22 features), at about 16/64/144 tokens.

Every cell is one `ablate.measure` (random weights, Qwen2-0.5B as the LLM for both encoders, FastVLM-0.5B's
connector), so the figures are the toolkit's own: stage medians and one-call TTFT. Rows print as they finish;
`--jsonl` keeps the records. Counts that pooling cannot reach on a grid use adaptive pooling (marked).

    python benchmarks/reducers.py --repeats 3 --warmup 1 --threads 2 --jsonl reducers.jsonl
    python benchmarks/reducers.py --budgets 64 --reducers prumerge visionzip   # a few cells
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time

import ablate
from ablate.api.errors import AblateError, ResourceError
from ablate.model.downsampling import downsampled
from ablate_plugins.reducers.pooling import kernels

PRESET = "fastvlm-0.5b"  # FastViTHD@1024 + mlp2x_gelu + Qwen2-0.5B
ENCODERS = {
    # name: (overrides, token grid side, score for the scored reducers, VisionZip's extra encoder option)
    "fastvithd@1024": ([], 16, "mean_query", []),
    "clip-vit-l14@336": (
        ["encoder=timm", "encoder.model_name=vit_large_patch14_clip_336.openai", "encoder.feature_block=22"],
        24,
        "cls",
        ["encoder.attention_block=22"],  # VisionZip reads the attention of the layer whose output it reduces
    ),
}


def cells(encoder: str, budget: int) -> dict[str, list[str]]:
    overrides, side, score, visionzip = ENCODERS[encoder]
    pooled = [f"reducer.tokens={budget}"] + ([] if budget in kernels((side, side)) else ["reducer.adaptive=true"])
    return {
        "avgpool": [*overrides, "reducer=avgpool", *pooled],
        "matryoshka": [*overrides, "reducer=matryoshka", *pooled],
        "prumerge": [*overrides, "reducer=prumerge", f"reducer.tokens={budget}", f"reducer.score={score}"],
        "prumerge-plus": [*overrides, "reducer=prumerge-plus", f"reducer.tokens={budget}", f"reducer.score={score}"],
        "visionzip": [
            *overrides,
            *visionzip,
            "reducer=visionzip",
            f"reducer.tokens={budget}",
            f"reducer.score={score}",
        ],
        "random": [*overrides, "reducer=random", f"reducer.tokens={budget}"],
        "fastv (K=2)": [*overrides, "reducer=fastv", "reducer.layer=2", f"reducer.tokens={budget}"],
        "downsample": downsampled(PRESET, budget, overrides),
    }


def row(encoder: str, reducer: str, target: str, record: dict, seconds: float) -> str:
    latency = record["latency_ms"]
    config, marks = record["config"], []
    if config["reducer"].get("adaptive"):
        marks.append("adaptive pool")
    if reducer == "downsample":
        marks.append(f"{config['encoder']['image_size']} px")
    if reducer.startswith("fastv"):
        marks.append(f"{config['reducer']['tokens']} kept from layer 2")
    cols = [latency[key] for key in ("encoder", "reducer", "connector", "prefill", "ttft")]
    return (
        f"| {encoder} | {reducer} | {target} | {record['visual_tokens']} | "
        + " | ".join(f"{value:,.1f}" for value in cols)
        + f" | {', '.join(marks)} | {seconds:.0f} |"
    )


def release_memory() -> None:
    """Hand the last cell's freed memory back to the system (glibc keeps it otherwise), so the next cell's memory
    check sees it, and so do other processes on a shared machine."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[16, 64, 144])
    parser.add_argument("--reducers", nargs="+", help="only these cells (names as in the table)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jsonl", help="append every record to this file")
    parser.add_argument("--retries", type=int, default=30, help="minutes to wait for memory another process holds")
    args = parser.parse_args()
    options = dict(repeats=args.repeats, warmup=args.warmup, threads=args.threads)

    columns = ["encoder", "reducer", "target", "LLM visual tokens", "encoder ms", "reducer ms", "connector ms"]
    columns += ["prefill ms", "TTFT ms", "note", "wall s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    # The unreduced models first, then budget by budget with both encoders side by side, so that a run cut short
    # still compares like with like; the released (adaptive) PruMerge last.
    plan = [(encoder, "none", "-", [*ENCODERS[encoder][0], "reducer=none"]) for encoder in args.encoders]
    plan += [
        (encoder, name, str(budget), cell)
        for budget in args.budgets
        for encoder in args.encoders
        for name, cell in cells(encoder, budget).items()
    ]
    for encoder in args.encoders:
        overrides, score = ENCODERS[encoder][0], ENCODERS[encoder][2]
        plan.append((encoder, "prumerge (adaptive)", "IQR", [*overrides, "reducer=prumerge", f"reducer.score={score}"]))
    for encoder, name, target, cell in plan:
        if args.reducers and name not in args.reducers:
            continue
        start = time.perf_counter()
        for attempt in range(args.retries + 1):
            release_memory()
            try:
                record = ablate.measure(PRESET, cell, **options).to_dict()
                break
            except ResourceError as error:  # other work on a shared machine holds the memory: wait for it
                if attempt == args.retries:
                    record = error
                else:
                    time.sleep(60)
            except AblateError as error:
                record = error
                break
        if isinstance(record, AblateError):
            print(f"| {encoder} | {name} | {target} | error: {record} |", flush=True)
            continue
        print(row(encoder, name, target, record, time.perf_counter() - start), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as out:
                out.write(json.dumps({"encoder": encoder, "reducer": name, "target": target, **record}) + "\n")
    print(f"# {sys.argv[0]}: medians of {args.repeats} repeats after {args.warmup} warm-up, {args.threads} threads")


if __name__ == "__main__":
    main()
