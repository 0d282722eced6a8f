"""The toolkit's overhead over a hand-written ONNX Runtime pipeline of the same graphs: TTFT ratio.

    python benchmarks/ort_overhead.py                                         # tiny
    python benchmarks/ort_overhead.py --config fastvlm-0.5b --image-size 1024 --threads 1 --repeats 5

`ablate export` writes the stages' ONNX files; the hand-written side loads them into InferenceSessions of its own
(same thread count) and runs them in turn on example.npz's arrays, feeding each stage the outputs of the one before,
as a user would. The toolkit's side is a timed `ablate.measure` run in ONNX Runtime. Hand-written blocks run before
and after the toolkit's run; the ratio is toolkit TTFT median / hand-written median (both blocks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import ablate


def hand_written(folder: Path, threads: int):
    """A function running the exported stages in turn, ONNX Runtime and numpy only."""
    manifest = json.loads((folder / "manifest.json").read_text())
    example = np.load(folder / "example.npz")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    stages = []
    for stage in manifest["stages"]:
        if stage.get("file") is None:
            assert stage["runtime"] == "no-op", f"{stage['name']} ran in {stage['runtime']}: nothing to compare"
            continue
        session = onnxruntime.InferenceSession(str(folder / stage["file"]), options, providers=["CPUExecutionProvider"])
        stages.append((session, [i["name"] for i in stage["inputs"]], [o["name"] for o in stage["outputs"]]))
    start = {"pixel_values": example["pixel_values"], "input_ids": example["input_ids"]}

    def ttft():
        values = dict(start)
        for session, inputs, outputs in stages:
            results = session.run(outputs, {name: values[name] for name in inputs})
            values.update({name.removesuffix("_out"): result for name, result in zip(outputs, results)})
        return values["logits"]

    return ttft, example["logits"]


def timed(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    overrides = [f"encoder.image_size={args.image_size}"] if args.image_size else []
    with tempfile.TemporaryDirectory() as folder:
        export = Path(folder) / "export"
        ablate.measure(args.config, overrides, runtime="onnxruntime", export=str(export), repeats=1, warmup=0)
        ttft, logits = hand_written(export, args.threads)
        error = np.abs(ttft() - logits).max() / np.abs(logits).max()
        hand = timed(ttft, args.repeats)
        record = ablate.measure(
            args.config, overrides, runtime="onnxruntime", repeats=args.repeats, warmup=1, threads=args.threads
        )
        hand += timed(ttft, args.repeats)
    toolkit, by_hand = record.latency_ms.ttft, statistics.median(hand)
    print(f"{args.config}{' @' + str(args.image_size) + ' px' if args.image_size else ''}, {args.threads} threads")
    print(f"hand-written ONNX Runtime TTFT: {by_hand:,.2f} ms (median of {len(hand)}; logits within {error:.1e})")
    print(f"toolkit (run.runtime=onnxruntime) TTFT: {toolkit:,.2f} ms (median of {record.timing.repeats})")
    print(f"toolkit / hand-written: {toolkit / by_hand:.3f}")


if __name__ == "__main__":
    main()
