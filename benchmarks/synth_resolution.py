"""Accuracy vs TTFT over input resolution on the synthetic text-reading task: FastVLM's central effect in minutes.

For each resolution, trains `synth-tiny` (stage 1, then stage 2) at that resolution, evaluates it on the held-out
questions (`ablate eval`: exact match, ANLS, TTFT in one record, stored in a results store as `ablate eval --db`
does), prints one table and saves two plots: the loss curve of the run at the preset's own resolution, and the
toolkit's accuracy-vs-TTFT Pareto plot of the stored records (`ablate plot`'s accuracy_vs_ttft).

    python benchmarks/synth_resolution.py --sizes 64 128 256 --work /tmp/synth-grid --plots docs/

Runs already finished in --work are reused (a killed script resumes its runs). Plotting needs matplotlib and
plotly (`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import ablate
from ablate.grid.store import Store
from ablate.report.plots import write_plots
from ablate.train.data.synth import SynthOptions, generate, parse_font_size
from ablate.train.evaluation import eval_key, evaluate
from ablate.train.loop import train
from ablate.train.run_dir import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--work", type=Path, default=Path("/tmp/synth-grid"), help="data and run folders")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the PNGs (default: --work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--font-size", default="20-24", help="text height on the 256 px canvas, N or LOW-HIGH")
    parser.add_argument("--steps", type=int, default=None, help="stage 2 steps (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=10, help="timing repeats per resolution")
    parser.add_argument("--threads", type=int, default=1, help="timing threads (synth-tiny trains with 1)")
    args = parser.parse_args()
    data = args.work / "data"
    if not (data / "meta.json").is_file():
        generate(data, SynthOptions(seed=args.seed, font_size=parse_font_size(args.font_size)))
    preset_size = ablate.load_config("synth-tiny").encoder.image_size
    rows = []
    for size in args.sizes:
        run_dir = args.work / f"res{size}"
        started = time.perf_counter()
        overrides = [f"encoder.image_size={size}"] + ([f"train.stages.1.steps={args.steps}"] if args.steps else [])
        summary = train("synth-tiny", overrides, data=data, out=run_dir)
        wall = summary["wall_s"] if summary["resumed_from_step"] is None else None
        record = evaluate(run_dir, data=data, repeats=args.repeats, warmup=2, threads=args.threads)
        with Store(args.work / "results.db") as store:
            store.put(eval_key(record), record, label=f"{size} px")
        record = record.to_dict()
        (run_dir / "eval.json").write_text(json.dumps({**record, "train_wall_s": wall}, indent=1))
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
    write_plots([record for _, record, _, _ in rows], args.work / "plots")
    shutil.copy(args.work / "plots" / "accuracy_vs_ttft.png", plots / "synth-accuracy-vs-ttft.png")
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
