"""Accuracy vs TTFT over input resolution on the synthetic text-reading task: FastVLM's central effect in minutes.

For each resolution, trains `synth-tiny` (stage 1, then stage 2) at that resolution, evaluates it on the held-out
questions (`ablate eval`: exact match, ANLS, TTFT in one record), prints one table and saves two plots: the loss
curve of the run at the preset's own resolution, and accuracy against TTFT per resolution.

    python benchmarks/synth_resolution.py --sizes 64 128 256 --work /tmp/synth-grid --plots docs/

Runs already finished in --work are reused (a killed script resumes its runs). Plotting needs matplotlib
(`pip install -e '.[plot]'`). This plot is plain matplotlib until the grid store's own Pareto plot reads `accuracy`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ablate
from ablate.data.synth import SynthOptions, generate
from ablate.evaluation import evaluate
from ablate.runs import read_metrics
from ablate.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--work", type=Path, default=Path("/tmp/synth-grid"), help="data and run folders")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the PNGs (default: --work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="timing repeats per resolution")
    parser.add_argument("--threads", type=int, default=1, help="timing threads (synth-tiny trains with 1)")
    args = parser.parse_args()
    data = args.work / "data"
    if not (data / "meta.json").is_file():
        generate(data, SynthOptions(seed=args.seed))
    preset_size = ablate.load_config("synth-tiny").encoder.image_size
    rows = []
    for size in args.sizes:
        run_dir = args.work / f"res{size}"
        started = time.perf_counter()
        summary = train("synth-tiny", [f"encoder.image_size={size}"], data=data, out=run_dir)
        wall = summary["wall_s"] if summary["resumed_from_step"] is None else None
        record = evaluate(run_dir, data=data, repeats=args.repeats, warmup=2, threads=args.threads)
        record["train_wall_s"] = wall
        (run_dir / "eval.json").write_text(json.dumps(record, indent=1))
        rows.append((size, record, wall, time.perf_counter() - started))
    print("| input px | visual tokens | exact match | ANLS | chance | TTFT ms (median) | train wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size, record, wall, _ in rows:
        accuracy = record["accuracy"]
        print(
            f"| {size} | {record['visual_tokens']} | {accuracy['exact_match']:.1%} | {accuracy['anls']:.3f} | "
            f"{accuracy['chance']:.1%} | {record['latency_ms']['ttft']:.2f} | {'-' if wall is None else f'{wall:.0f}'} |"
        )
    plots = args.plots or args.work
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plots written.")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ttft = [record["latency_ms"]["ttft"] for _, record, _, _ in rows]
    accuracy = [record["accuracy"]["exact_match"] * 100 for _, record, _, _ in rows]
    axis.plot(ttft, accuracy, "o-")
    for (size, *_), x, y in zip(rows, ttft, accuracy):
        axis.annotate(f"{size} px", (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    axis.axhline(rows[0][1]["accuracy"]["chance"] * 100, color="grey", linestyle="--", linewidth=1, label="chance")
    axis.set_xlabel("TTFT (ms, CPU, median)")
    axis.set_ylabel("exact match (%)")
    axis.set_ylim(0, 105)
    axis.set_title("synth-tiny: accuracy vs TTFT by input resolution", fontsize=9)
    axis.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    figure.savefig(plots / "synth-accuracy-vs-ttft.png")
    curve_size = preset_size if preset_size in args.sizes else args.sizes[-1]
    metrics = read_metrics(args.work / f"res{curve_size}")
    figure, axis = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    for stage in dict.fromkeys(row["stage"] for row in metrics):
        points = [(row["step"], row["loss"]) for row in metrics if row["stage"] == stage]
        axis.plot(*zip(*points), label=stage)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title(f"synth-tiny at {curve_size} px: stage 1, then stage 2", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(plots / "synth-tiny-loss.png")
    print(f"plots: {plots / 'synth-accuracy-vs-ttft.png'}, {plots / 'synth-tiny-loss.png'}")


if __name__ == "__main__":
    main()
