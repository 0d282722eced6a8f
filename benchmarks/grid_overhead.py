"""How much of a count-only grid's time is the grid machinery (expansion, results store, runner), not measuring?

A 100-cell count-only grid of FastVLM variants (5 resolutions x 10 prompt lengths x 2 LLM sizes) is expanded, then
every cell is measured twice, alternating in one process: by `ablate.measure` alone, and by the grid's unit of work
(`run_cell`: measure, then write the row to a fresh SQLite store). The script prints seconds per cell, the expansion
cost per cell, and the toolkit's share (expansion + store + runner) of a cell's time.

    python benchmarks/grid_overhead.py                 # 100 cells of fastvlm-0.5b / 1.5b
    python benchmarks/grid_overhead.py --cells 20      # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median

from alternate import alternate

import ablate
from ablate.grid.expansion import load_grid
from ablate.grid.runner import run_cell
from ablate.grid.store import Store

SIZES = "256,512,768,1024,1536"
PROMPTS = "8,16,24,32,40,48,56,64,72,80"
ARCHS = "qwen2-0.5b,qwen2-1.5b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fastvlm-0.5b")
    parser.add_argument("--cells", type=int, default=100, help="the first N cells of the 100-cell grid")
    args = parser.parse_args()

    start = time.perf_counter()
    grid = load_grid(
        args.preset,
        [f"encoder.image_size={SIZES}", f"prompt_tokens={PROMPTS}", f"decoder.arch={ARCHS}"],
        {"count_only": True},
    )
    expand_s = time.perf_counter() - start
    cells = grid.cells[: args.cells]
    folder = Path(tempfile.mkdtemp())
    with Store(folder / "r.db") as store:  # create it once, as the runner does before the first cell
        store.add_grid(grid.id, grid.name, grid.spec, [(cell.key, cell.label) for cell in grid.cells])

    measure_s, cell_s = [], []
    for cell in cells:
        task = {
            "key": cell.key,
            "label": cell.label,
            "base": grid.base,
            "overrides": list(cell.overrides),
            "run": grid.run,
            "device": cell.device,
            "db": str(folder / "r.db"),
        }
        samples = alternate(
            {
                "measure": lambda cell=cell: ablate.measure(grid.base, cell.overrides, **grid.run).to_dict(),
                "grid cell": lambda task=task: run_cell(task),
            },
            repeats=1,
            warmup=0,
        )
        measure_s.append(samples["measure"][0] / 1000)
        cell_s.append(samples["grid cell"][0] / 1000)

    per_cell_expand = expand_s / len(grid.cells)
    per_cell = median(cell_s) + per_cell_expand
    toolkit = per_cell - median(measure_s)
    print(f"{len(cells)} count-only cells of {args.preset} (grid of {len(grid.cells)}), alternating in one process")
    print(
        f"  expansion (resolve + hash every cell): {expand_s:6.2f} s in all, {per_cell_expand * 1000:7.1f} ms per cell"
    )
    print(f"  ablate.measure alone:                  {median(measure_s):6.3f} s per cell (median)")
    print(f"  grid cell (measure + store write):     {median(cell_s):6.3f} s per cell (median)")
    print(f"  a grid cell in all (with expansion):   {per_cell:6.3f} s per cell")
    print(f"  toolkit share (expansion, store, runner): {toolkit * 1000:7.1f} ms per cell = {toolkit / per_cell:6.1%}")
    print(f"  the whole grid would take about {per_cell * len(grid.cells):.0f} s here")


if __name__ == "__main__":
    main()
