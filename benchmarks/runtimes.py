"""Every runtime x quantization that runs here, side by side: TTFT and each stage, TTFT over its roofline floor,
the largest deviation from torch's float eager outputs, where each stage ran and the prepare (export) time.

    python benchmarks/runtimes.py                                  # tiny
    python benchmarks/runtimes.py --config fastvlm-0.5b --image-size 1024 --threads 1 --repeats 3

Each variant is one `ablate.measure` run, one after the other in this process (not alternated: compare ratios
well above the runs' spread). Quantized variants quantize the connector and the decoder, or in OpenVINO the encoder
and the connector (its converter refuses the prefill, which then runs in torch); the torchao schemes
(int8-weight-only, int4-weight-only) need `pip install 'ablate-vlm[torchao]'` in torch, OpenVINO's need nncf
(`pip install 'ablate-vlm[openvino]'`). A variant whose runtime is not installed prints its error and the rest run.
"""

from __future__ import annotations

import argparse

import ablate
from ablate.api import AblateError


def quantized(scheme: str, parts=("connector", "decoder")) -> list[str]:
    return [f"run.quantize.{part}={scheme}" for part in parts]


VISION = ("encoder", "connector")  # the stages OpenVINO runs (its converter refuses the decoder prefill)
VARIANTS = [  # (label, runtime, overrides)
    ("torch eager float32", "torch", []),
    ("torch compile float32", "torch", ["run.mode=compile"]),
    ("torch eager bfloat16", "torch", ["run.dtype=bfloat16"]),
    ("torch eager int8-dynamic", "torch", quantized("int8-dynamic")),
    ("torch eager int8-weight-only", "torch", quantized("int8-weight-only")),
    ("torch eager int4-weight-only", "torch", quantized("int4-weight-only")),
    ("onnxruntime float32", "onnxruntime", []),
    ("onnxruntime int8-dynamic", "onnxruntime", quantized("int8-dynamic")),
    ("openvino float32", "openvino", []),
    ("openvino int8-dynamic encoder + connector", "openvino", quantized("int8-dynamic", VISION)),
    ("openvino int8-weight-only encoder + connector", "openvino", quantized("int8-weight-only", VISION)),
    ("executorch float32", "executorch", []),
    ("executorch int8-dynamic", "executorch", quantized("int8-dynamic")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="labels of the variants to run (default: all)")
    args = parser.parse_args()
    base = [f"encoder.image_size={args.image_size}"] if args.image_size else []
    print(
        "| variant | TTFT ms | encoder | reducer | connector | prefill | TTFT / floor | max deviation | ran in | "
        "prepare s | weights MiB (quantized parts) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, runtime, overrides in VARIANTS:
        if args.only and label not in args.only:
            continue
        options = dict(repeats=args.repeats, warmup=args.warmup, runtime=runtime)
        if args.threads:
            options["threads"] = args.threads
        try:
            record = ablate.measure(args.config, base + overrides, **options).to_dict()
        except AblateError as exc:
            print(f"| {label} | failed: {str(exc)[:120]} |")
            continue
        latency, execution = record["latency_ms"], record["execution"]
        floor = record["roofline"]["stages"]["ttft"] or {}
        deviations = [v for v in (execution["deviation_from_eager"] or {}).values() if v is not None]
        where = ", ".join(f"{stage} {ran}" for stage, ran in (execution["runtimes"] or {}).items())
        prepare = sum((execution["prepare_s"] or {}).values())
        quantization = record["quantization"]
        weights = "-"
        if quantization:
            before = sum(quantization["float_bytes"].values()) / 2**20
            after = sum(quantization["quantized_bytes"].values()) / 2**20
            weights = f"{before:,.1f} -> {after:,.1f} (KL {quantization['fidelity']['kl']:.2g})"
        stages = " | ".join(f"{latency[s]:,.1f}" for s in ("encoder", "reducer", "connector", "prefill"))
        print(
            f"| {label} | {latency['ttft']:,.1f} | {stages} | {floor.get('measured_over_floor') or 0:,.1f} | "
            f"{max(deviations, default=0):.1e} | {where} | {prepare:,.1f} | {weights} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
