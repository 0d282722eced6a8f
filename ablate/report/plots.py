"""Plots of stored results: a PNG (matplotlib) and an interactive HTML file (plotly) of each.

From timed rows:
    ttft_vs_tokens          TTFT against visual tokens, with the Pareto front (the cells no other cell beats with as
                            many tokens or more at a TTFT as low or lower)
    stage_latency           per-stage latency (encoder, reducer, connector, LLM prefill) stacked, one bar per cell
    encoder_vs_resolution   encoder latency against input resolution, one line per encoder
    accuracy_vs_ttft        exact-match accuracy against TTFT with the Pareto front, for rows `ablate eval --db`
                            stored (a trained variant's accuracy and timing in one record)
    fidelity_vs_ttft        first-token KL against no reduction (run.fidelity) against TTFT with the Pareto front:
                            a token-reduction study's methods and budgets side by side
    throughput_vs_batch     output tokens/s (rows with --max-new-tokens; else images/s) against batch_size, one line
                            per cell with its batch size varied
    ttft_vs_time_per_token  TTFT against the median time per output token (rows with --max-new-tokens)
From every row with counts (count-only grids too):
    flops_vs_tokens         total FLOPs against visual tokens, with the Pareto front (as many tokens, fewer FLOPs)
    encoder_flops_vs_resolution   the encoder's FLOPs against input resolution, one line per encoder
    params                  parameters per component, one bar per distinct model
    kv_cache_vs_tokens      the KV cache's size (computed) against visual tokens, with the Pareto front

Cells are named by the config keys that vary between the rows plotted and apply to the cell
(`ablate.report.labels`). In the token plots colour is the encoder (the first component that varies), the marker
the next component that varies (the reducer), the line style the rest; one line joins the cells that differ only in
input size. A hollow marker is an upper bound: a reducer that decides by the image, counted without one. Failed
rows are left out; a plot with nothing to show is skipped and said so. Titles say what the figures come from
(device, dtype and mode for timings) and which way is better. Needs `pip install 'ablate-vlm[plot]'`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.api.errors import ConfigError
from ablate.api.hooks import KINDS
from ablate.measurement.record import value_at
from ablate.model.vlm import STAGES
from ablate.report.labels import cell_label, cell_labels, cell_values, kind_of, varying_keys
from ablate.version import DISTRIBUTION

STAGE_NAMES = {"encoder": "encoder", "reducer": "reducer", "connector": "connector", "prefill": "LLM prefill"}
RESOLUTION_KEY = "encoder.image_size"
SIZE_KEYS = (RESOLUTION_KEY, "encoder.target_tokens", "encoder.image_size_fit")  # what the x axis already shows
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")
MARKERS = (("o", "circle"), ("s", "square"), ("D", "diamond"), ("^", "triangle-up"), ("v", "triangle-down"))
DASHES = (("-", "solid"), ("--", "dash"), (":", "dot"), ("-.", "dashdot"))
WIDTH_IN = 8.0  # every figure: 800 px wide at 100 dpi; legends go below the axes, so long names add height
COUNTED = "counted from the configs, for one image (no timing needed; the weights do not change counts)"
WRAP = 48  # characters of a legend entry or bar label per line


def _libraries():
    try:
        import plotly.graph_objects as go
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            f"Plots need matplotlib and plotly ({exc.name} is not installed): `pip install '{DISTRIBUTION}[plot]'`."
        ) from None
    return Figure, FigureCanvasAgg, go


def _number(record: dict[str, Any], path: str) -> float | None:
    value = value_at(record, path)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _timed(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if not record.get("error") and _number(record, "latency_ms.ttft")]


def _counted(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if not record.get("error") and _number(record, "flops.total")]


def resolution(record: dict[str, Any]) -> int | None:
    """The input size that ran: ablate's choice, else the config's, else the measured image's width."""
    size = cell_values(record, [RESOLUTION_KEY]).get(RESOLUTION_KEY)
    return size if isinstance(size, int) else (record.get("image") or {}).get("width")


def _bounded(record: dict[str, Any]) -> bool:
    return record.get("count_basis") == "upper bound"


def _random_count(record: dict[str, Any]) -> bool:
    """Tokens an image-dependent reducer kept with random weights: says nothing about trained ones."""
    return record.get("count_basis") == "measured image" and not record.get("weights")


def title_context(records: list[dict[str, Any]]) -> str:
    """'cpu (Intel Xeon ...), float32, mode eager, 1 thread' from the records (every distinct value, if they differ)."""

    def distinct(values):
        return " / ".join(dict.fromkeys(str(value) for value in values if value is not None)) or "?"

    devices = distinct(
        f"{(r.get('run') or {}).get('device')} ({(r.get('env') or {}).get('device_name')})" for r in records
    )
    dtypes = distinct((r.get("run") or {}).get("dtype") for r in records)
    modes = distinct((r.get("run") or {}).get("mode") for r in records)
    threads = distinct((r.get("run") or {}).get("threads") for r in records)
    return f"{devices}, {dtypes}, mode {modes}, CPU threads: {threads}"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (value, cost) points, more value being better (visual tokens, accuracy) and less cost (TTFT,
    FLOPs), that no other point beats: as much value or more at as little cost or less, and strictly better in one.
    In order of cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front, best_value = [], float("-inf")
    for index in order:
        if points[index][0] > best_value:
            front.append(index)
            best_value = points[index][0]
    return front


def write_plots(
    records: Iterable[dict[str, Any]], out: str | Path, plotly_js: str | bool = "directory"
) -> tuple[list[Path], list[str]]:
    """Write every plot that has data as OUT/NAME.png and OUT/NAME.html; returns (files, notes on skipped plots).

    `plotly_js`: how the HTML gets plotly.js ('directory': one shared plotly.min.js beside the files, works offline;
    'cdn': a link, for pages viewed online; True: embedded in each file)."""
    Figure, FigureCanvasAgg, go = _libraries()
    records = list(records)
    if not records:
        raise ConfigError(
            "No rows to plot: the store (or the filter) holds none. Run a grid first, or loosen the filter."
        )
    timed, counted = _timed(records), _counted(records)
    if not timed and not counted:
        raise ConfigError(
            f"None of the {len(records)} rows has timings or counts to plot (failed cells only). See why with "
            f"`ablate results --status failed`, fix the cells and run the grid again."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timed_context = title_context(timed) if timed else ""
    files: list[Path] = []
    notes: list[str] = []
    plots: list[tuple[str, Callable, list[dict[str, Any]], str]] = [
        ("ttft_vs_tokens", _ttft_vs_tokens, timed, timed_context),
        ("stage_latency", _stage_latency, timed, timed_context),
        ("encoder_vs_resolution", _encoder_vs_resolution, timed, timed_context),
        ("accuracy_vs_ttft", _accuracy_vs_ttft, timed, timed_context),
        ("fidelity_vs_ttft", _fidelity_vs_ttft, timed, timed_context),
        ("throughput_vs_batch", _throughput_vs_batch, timed, timed_context),
        ("ttft_vs_time_per_token", _ttft_vs_time_per_token, timed, timed_context),
        ("flops_vs_tokens", _flops_vs_tokens, counted, COUNTED),
        ("encoder_flops_vs_resolution", _encoder_flops_vs_resolution, counted, COUNTED),
        ("params", _params, counted, COUNTED),
        ("kv_cache_vs_tokens", _kv_cache_vs_tokens, counted, COUNTED),
    ]
    for name, make, rows, context in plots:
        if not rows:
            why = "timings (count-only rows: see the FLOPs and params plots)" if rows is timed else "FLOP counts"
            notes.append(f"{name}: no row has {why}")
            continue
        made = make(rows, context, Figure, go)
        if isinstance(made, str):
            notes.append(f"{name}: {made}")
            continue
        figure, plotly_figure = made
        FigureCanvasAgg(figure)
        png = out / f"{name}.png"
        figure.savefig(png, dpi=100, bbox_inches="tight")
        html = out / f"{name}.html"
        plotly_figure.write_html(html, include_plotlyjs=plotly_js, full_html=True)
        files += [png, html]
    return files, notes


# ---------------------------------------------------------------------------------------------- look


def _wrap(text: str, width: int = WRAP) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def _new_figure(Figure, title: str, context: str, how_to_read: str = "", height: float = 4.8):
    figure = Figure(figsize=(WIDTH_IN, height))
    axes = figure.add_subplot()
    lines = [title, _wrap(context, 95)] + ([_wrap(how_to_read, 95)] if how_to_read else [])
    axes.set_title("\n".join(lines), fontsize=9, loc="left")
    axes.grid(True, alpha=0.3)
    return figure, axes


def _legend_below(figure, handles=None, title: str | None = None) -> None:
    """The legend under the figure's panels, as many columns as fit the width: long names add height, not width."""
    if handles is None:
        handles = [handle for axes in figure.axes for handle in axes.get_legend_handles_labels()[0]]
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    if not handles:
        return
    labels = [handle.get_label() for handle in handles]
    longest = max(len(line) for label in labels for line in label.split("\n"))
    columns = max(1, min(len(handles), int(150 // (longest + 8))))  # about 150 characters of 7 pt to a row
    figure.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=columns,
        fontsize=7,
        title=title,
        title_fontsize=7,
        frameon=False,
    )


def _plotly_layout(go, title: str, context: str, x: str, y: str, how_to_read: str = "", **extra) -> Any:
    subtitle = context + (f"<br>{how_to_read}" if how_to_read else "")
    return go.Layout(
        title={"text": f"{title}<br><sup>{subtitle}</sup>"},
        xaxis={"title": {"text": x}},
        yaxis={"title": {"text": y}},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
        **extra,
    )


@dataclass
class Style:
    """How a token plot tells cells apart: colour by one group of varying keys, marker by a second, dash by the rest;
    the keys the x axis already shows (input size) join a series' cells into one line."""

    colour_keys: list[str]
    marker_keys: list[str]
    dash_keys: list[str]

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Style:
        keys = [key for key in varying_keys(records) if key not in SIZE_KEYS]
        keys = [key for key in keys if not _follows_from_names(records, key, keys)]
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(kind_of(key) or "", []).append(key)
        order = [kind for kind in (*KINDS, "") if kind in groups]
        pick = [groups[kind] for kind in order[:2]]
        return cls(
            pick[0] if pick else [], pick[1] if len(pick) > 1 else [], [k for kind in order[2:] for k in groups[kind]]
        )

    def values(self, record: dict[str, Any]) -> tuple[str, str, str]:
        return tuple(
            cell_label(record, keys, fallback="") for keys in (self.colour_keys, self.marker_keys, self.dash_keys)
        )


def _follows_from_names(records: list[dict[str, Any]], key: str, keys: list[str]) -> bool:
    """An option one value per combination of the varying component names (`reducer.score` that `auto` chose for
    each encoder): the colour and marker show it already."""
    names = [k for k in keys if kind_of(k) and k.endswith(".name")]
    if key in names or not names:
        return False
    seen: dict[str, set] = {}
    for record in records:
        values = cell_values(record, [*names, key])
        seen.setdefault(repr([values.get(k) for k in names]), set()).add(repr(values.get(key)))
    return all(len(found) == 1 for found in seen.values())


def _wide(values: list[float]) -> bool:
    """A range wide enough for a log axis (one encoder at 16 tokens, another at 12,000)."""
    positive = [v for v in values if v and v > 0]
    return bool(positive) and max(positive) > 20 * min(positive)


def _plain_log_labels(axis) -> None:
    """A log axis labelled 20, 50, 100 rather than 2x10^1."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _token_plot(points, y_of, title, context, how_to_read, x_label, y_label, front_label, Figure, go):
    """Y against visual tokens: colour and marker by the first two groups of varying keys (Style), one panel per
    value of the rest (the decoder: TTFT is comparable only at one LLM), one line per series (cells that differ
    only in input size), each point named by its size, each panel's Pareto front dashed (most tokens, least Y)."""
    from matplotlib.lines import Line2D

    style = Style.of(points)
    colours: dict[str, str] = {}
    markers: dict[str, tuple[str, str]] = {}
    dashes: dict[str, tuple[str, str]] = {}
    panels: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for record in points:
        colour, marker, panel = style.values(record)
        colours.setdefault(colour, COLORS[len(colours) % len(COLORS)])
        markers.setdefault(marker, MARKERS[len(markers) % len(MARKERS)])
        dashes.setdefault(panel, DASHES[len(dashes) % len(DASHES)])
        panels.setdefault(panel, {}).setdefault((colour, marker), []).append(record)
    columns = 1 if len(panels) <= 3 else 2
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(WIDTH_IN, 1.6 + (3.6 if rows == 1 else 2.9 * rows)))
    grid = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    log_x = _wide([r["visual_tokens"] for r in points])
    log_y = _wide([y_of(r) for r in points])
    traces = []
    for index, (panel, series) in enumerate(panels.items()):
        axes = grid[index // columns][index % columns]
        axes.grid(True, alpha=0.3)
        if panel:
            axes.set_title(panel, fontsize=8, loc="left")
        members_of_panel = [r for members in series.values() for r in members]
        for (colour, marker), members in series.items():
            members.sort(key=lambda r: r["visual_tokens"])
            xs, ys = [r["visual_tokens"] for r in members], [y_of(r) for r in members]
            color, (mpl_marker, plotly_marker) = colours[colour], markers[marker]
            axes.plot(xs, ys, color=color, alpha=0.6, linewidth=1.1)
            for record, x, y in zip(members, xs, ys):
                faces = "none" if _bounded(record) else color
                axes.scatter([x], [y], marker=mpl_marker, s=28, zorder=3, edgecolors=color, facecolors=faces)
                if resolution(record):
                    text = f"{resolution(record)}{'*' if _random_count(record) else ''}"
                    axes.annotate(text, (x, y), textcoords="offset points", xytext=(4, -8), fontsize=6)
            traces.append(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers",
                    name=" ".join(part for part in (colour, marker, panel) if part) or "cells",
                    line={"color": color, "dash": dashes[panel][1]},
                    marker={"symbol": [plotly_marker + ("-open" if _bounded(r) else "") for r in members], "size": 9},
                    text=[cell_label(r, varying_keys(points)) + (" (at most)" if _bounded(r) else "") for r in members],
                    hovertemplate="%{text}<br>%{x} visual tokens<br>" + y_label + " %{y:,.1f}<extra></extra>",
                )
            )
        front = [members_of_panel[i] for i in pareto_front([(r["visual_tokens"], y_of(r)) for r in members_of_panel])]
        fx, fy = [r["visual_tokens"] for r in front], [y_of(r) for r in front]
        axes.step(fx, fy, where="pre", color="black", linestyle="--", linewidth=0.8, zorder=2)
        traces.append(
            go.Scatter(
                x=fx, y=fy, mode="lines", line={"shape": "vh", "dash": "dash", "color": "black"}, name=front_label
            )
        )
        if log_x:
            axes.set_xscale("log", base=2)
        if log_y:
            axes.set_yscale("log")
        if index // columns == rows - 1 or index + columns >= len(panels):
            axes.set_xlabel(x_label, fontsize=8)
            axes.tick_params(axis="x", labelbottom=True)
        if index % columns == 0:
            axes.set_ylabel(y_label, fontsize=8)
    for index in range(len(panels), rows * columns):  # an odd panel count leaves one cell empty
        grid[index // columns][index % columns].set_visible(False)
    if log_x:
        from matplotlib.ticker import ScalarFormatter

        grid[0][0].xaxis.set_major_formatter(ScalarFormatter())
    if log_y:
        _plain_log_labels(grid[0][0].yaxis)
    figure.suptitle("\n".join([title, _wrap(context, 110), _wrap(how_to_read, 110)]), fontsize=9, x=0.06, ha="left")
    # One legend for all panels: what the colours and markers mean, the front, hollow markers.
    handles = [Line2D([], [], color=c, marker="o", linestyle="-", label=_wrap(v)) for v, c in colours.items() if v]
    handles += [
        Line2D([], [], color="#555", marker=m, linestyle="none", label=_wrap(v)) for v, (m, _) in markers.items() if v
    ]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.8, label=front_label))
    if any(_bounded(r) for r in points):
        handles.append(
            Line2D(
                [],
                [],
                color="#555",
                marker="o",
                markerfacecolor="none",
                linestyle="none",
                label="hollow: at most (a reducer that decides by the image)",
            )
        )
    if any(_random_count(r) for r in points):
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                label="*: tokens an adaptive reducer kept on random weights (not a trained count)",
            )
        )
    _legend_below(figure, handles, title="the numbers at the points: input size (px) as it ran")
    layout = _plotly_layout(go, title, context, x_label, y_label, how_to_read)
    layout.xaxis.type = "log" if log_x else None
    layout.yaxis.type = "log" if log_y else None
    return figure, go.Figure(traces, layout)


def _ttft_vs_tokens(records, context, Figure, go):
    points = [r for r in records if isinstance(r.get("visual_tokens"), int)]
    if not points:
        return "no timed row has a number of visual tokens"
    return _token_plot(
        points,
        lambda r: _number(r, "latency_ms.ttft"),
        "TTFT vs visual tokens: at equal tokens, lower is faster",
        context,
        "Dashed: the Pareto front, the cells no other cell beats with as many tokens or more at a TTFT as low or "
        "lower (better: right and down).",
        "visual tokens per image (more: more image detail for the LLM)",
        "TTFT (ms), lower is better",
        "Pareto front (most tokens for the TTFT)",
        Figure,
        go,
    )


def _flops_vs_tokens(records, context, Figure, go):
    points = [r for r in records if isinstance(r.get("visual_tokens"), int)]
    if not points:
        return "no row has a number of visual tokens"
    return _token_plot(
        points,
        lambda r: _number(r, "flops.total") / 1e9,
        "FLOPs vs visual tokens: at equal tokens, lower costs less",
        context,
        "Dashed: the Pareto front, the cells no other cell beats with as many tokens or more at as few FLOPs or "
        "fewer (better: right and down).",
        "visual tokens per image (more: more image detail for the LLM)",
        "GFLOPs to the first token, lower is better",
        "Pareto front (most tokens for the FLOPs)",
        Figure,
        go,
    )


def _stacked_bars(items, parts, title, context, how_to_read, x_label, Figure, go, marks=None, ends=None):
    """One horizontal bar per (label, {part: value}) item, its parts stacked; `marks`: (name, a value per item)
    drawn as |; `ends`: a text per item written after its bar."""
    labels = [_wrap(label) for label, _ in items]
    lines = sum(label.count("\n") + 1 for label in labels)
    figure, axes = _new_figure(
        Figure, title, context, how_to_read, height=max(3.0, 1.8 + 0.2 * lines + 0.08 * len(items))
    )
    left = [0.0] * len(items)
    traces = []
    for index, (part, name) in enumerate(parts.items()):
        widths = [values.get(part) or 0.0 for _, values in items]
        color = COLORS[index % len(COLORS)]
        axes.barh(labels, widths, left=left, color=color, label=name)
        traces.append(
            go.Bar(y=[label for label, _ in items], x=widths, name=name, orientation="h", marker={"color": color})
        )
        left = [a + b for a, b in zip(left, widths)]
    if marks:
        label, values = marks
        axes.scatter(values, labels, marker="|", s=200, color="black", label=label, zorder=3)
    for label, text, width in zip(labels, ends or [], left):
        axes.annotate(text, (width, label), textcoords="offset points", xytext=(4, 0), va="center", fontsize=7)
    if ends:
        axes.set_xlim(0, max(left) * 1.3)  # room for the texts
    axes.invert_yaxis()  # the first item on top
    axes.set_xlabel(x_label)
    axes.tick_params(axis="y", labelsize=7)
    _legend_below(figure)
    layout = _plotly_layout(
        go, title, context, x_label, "", how_to_read, barmode="stack", height=max(350, 160 + 24 * len(items))
    )
    layout.yaxis.autorange = "reversed"
    return figure, go.Figure(traces, layout)


def _stage_latency(records, context, Figure, go):
    records = sorted(records, key=lambda r: _number(r, "latency_ms.ttft"))
    labels = cell_labels(records)
    items = [
        (label, {stage: _number(r, f"latency_ms.{stage}") for stage in STAGES}) for label, r in zip(labels, records)
    ]
    return _stacked_bars(
        items,
        STAGE_NAMES,
        "Latency per stage, fastest cell on top",
        context,
        "Bars: each stage's median over repeats, stacked; |: the TTFT of one whole call.",
        "latency (ms), median over repeats",
        Figure,
        go,
        marks=("TTFT (one call)", [_number(r, "latency_ms.ttft") for r in records]),
    )


def _params(records, context, Figure, go):
    """One bar per distinct model (cells that differ only in what does not change parameters share one)."""
    components = {kind: kind for kind in KINDS}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(_number(record, f"params.{kind}") for kind in KINDS), []).append(record)
    # a bar is named by the varying keys its cells share (a ViT's size changes its position embeddings: named)
    keys = varying_keys(records)
    items = []
    for members in groups.values():
        shared = [key for key in keys if len({repr(cell_values(r, [key])) for r in members}) == 1]
        first = members[0]
        items.append(
            (cell_label(first, shared), {kind: (_number(first, f"params.{kind}") or 0) / 1e6 for kind in KINDS})
        )
    items.sort(key=lambda item: sum(item[1].values()))
    return _stacked_bars(
        items,
        components,
        "Parameters per component, smallest model on top",
        context,
        "One bar per distinct model: cells with the same parameters in every component share one (a ViT's "
        "position embeddings grow with its input size; most reducers have none).",
        "parameters (millions)",
        Figure,
        go,
        ends=[f"{sum(values.values()):,.0f}M, encoder {values[KINDS[0]]:,.0f}M" for _, values in items],
    )


def _by_resolution(records, y_of, title, context, y_label, Figure, go):
    """Y against input resolution, one line per encoder (the encoder's keys that vary, input size aside); several
    cells of one encoder at one size (other components varied) count once, by their smallest Y."""
    keys = [key for key in varying_keys(records) if kind_of(key) == KINDS[0] and key not in SIZE_KEYS]
    points = [r for r in records if resolution(r) and y_of(r) is not None]
    if len({resolution(r) for r in points}) < 2:
        return "the rows span fewer than two input resolutions"
    x_label = "input resolution (px, square side), as it ran"
    how = "Lower is better; each line one encoder."
    return _lines(points, resolution, keys, "encoder", y_of, min, title, context, x_label, y_label, how, Figure, go)


def _lines(points, x_of, keys, fallback, y_of, pick, title, context, x_label, y_label, how_to_read, Figure, go):
    """Y against X, one line per cell label over `keys`; several points of one line at one X count once (`pick`)."""
    series: dict[str, dict[int, float]] = {}
    for record in points:
        by_x = series.setdefault(cell_label(record, keys, fallback=fallback), {})
        x = x_of(record)
        by_x[x] = y_of(record) if x not in by_x else pick(by_x[x], y_of(record))
    figure, axes = _new_figure(Figure, title, context, how_to_read)
    log_y = _wide([y for by_x in series.values() for y in by_x.values()])
    if log_y:
        axes.set_yscale("log")
        _plain_log_labels(axes.yaxis)
    traces = []
    for index, (name, by_x) in enumerate(series.items()):
        xs = sorted(by_x)
        ys = [by_x[x] for x in xs]
        color = COLORS[index % len(COLORS)]
        axes.plot(xs, ys, "o-", color=color, label=_wrap(name))
        traces.append(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, marker={"color": color}))
    axes.set_xticks(sorted({x for by_x in series.values() for x in by_x}))  # the values that ran, no fractions
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    _legend_below(figure)
    layout = _plotly_layout(go, title, context, x_label, y_label, how_to_read)
    layout.yaxis.type = "log" if log_y else None
    return figure, go.Figure(traces, layout)


def _throughput_vs_batch(records, context, Figure, go):
    """Output tokens/s (with decode) or images/s (TTFT only) against batch_size, one line per other cell."""
    path = "throughput.output_tokens_per_s"
    if not any(_number(r, path) for r in records):
        path = "throughput.images_per_s"
    points = [r for r in records if isinstance(r.get("batch_size"), int) and _number(r, path)]
    if len({r["batch_size"] for r in points}) < 2:
        return "the rows span fewer than two batch sizes (sweep batch_size=1,2,4)"
    keys = [key for key in varying_keys(points) if key != "batch_size"]
    what = "output tokens/s, end to end" if path.endswith("tokens_per_s") else "images/s to the first token"
    return _lines(
        points,
        lambda r: r["batch_size"],
        keys,
        "cells",
        lambda r: _number(r, path),
        max,
        f"Throughput vs batch size ({what})",
        context,
        "batch size (images and prompts per call)",
        what,
        "Higher is better; each line one cell, its batch size varied.",
        Figure,
        go,
    )


def _ttft_vs_time_per_token(records, context, Figure, go):
    """TTFT against the median time per output token: where a cell's cost goes, prefill or decode."""
    points = [r for r in records if _number(r, "decode.per_token_ms.median")]
    if not points:
        return "no timed row has decode timings (run with --max-new-tokens N)"
    keys = varying_keys(points)
    figure, axes = _new_figure(
        Figure,
        "TTFT vs time per output token: lower-left is faster in both",
        context,
        "Each point a cell; a token reducer moves a cell left (shorter prefill) more than down (decode reads the "
        "weights at every step whatever the tokens).",
    )
    traces = []
    for index, record in enumerate(points):
        x, y = _number(record, "latency_ms.ttft"), _number(record, "decode.per_token_ms.median")
        name = cell_label(record, keys, fallback="cell")
        color = COLORS[index % len(COLORS)]
        axes.scatter([x], [y], color=color, label=_wrap(name), zorder=3)
        traces.append(go.Scatter(x=[x], y=[y], mode="markers", name=name, marker={"color": color, "size": 10}))
    x_label, y_label = "TTFT (ms), median", "time per output token (ms), median"
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    _legend_below(figure)
    return figure, go.Figure(traces, _plotly_layout(go, "TTFT vs time per output token", context, x_label, y_label))


def _kv_cache_vs_tokens(records, context, Figure, go):
    points = [r for r in records if isinstance(r.get("visual_tokens"), int) and _number(r, "kv_cache.bytes")]
    if not points:
        return "no row has a KV-cache size (a decoder that states its shape)"
    return _token_plot(
        points,
        lambda r: _number(r, "kv_cache.bytes") / 2**20,
        "KV-cache memory vs visual tokens: at equal tokens, lower holds less",
        context,
        "The cache after the prefill and run.max_new_tokens tokens, for the batch, computed from the decoder's shape "
        "(in-LLM pruning included). Dashed: the Pareto front (better: right and down).",
        "visual tokens per image (more: more image detail for the LLM)",
        "KV cache (MiB), lower is better",
        "Pareto front (most tokens for the memory)",
        Figure,
        go,
    )


def _encoder_vs_resolution(records, context, Figure, go):
    return _by_resolution(
        records,
        lambda r: _number(r, "latency_ms.encoder"),
        "Encoder latency vs input resolution",
        context,
        "encoder latency (ms), median over repeats",
        Figure,
        go,
    )


def _encoder_flops_vs_resolution(records, context, Figure, go):
    def gflops(record):
        flops = _number(record, "flops.encoder")
        return None if flops is None else flops / 1e9

    return _by_resolution(records, gflops, "Encoder FLOPs vs input resolution", context, "encoder GFLOPs", Figure, go)


def _accuracy(record: dict[str, Any]) -> float | None:
    accuracy = record.get("accuracy")  # `ablate eval`'s block; other shapes (a plugin's own field) are not plotted
    value = accuracy.get("exact_match") if isinstance(accuracy, dict) else None
    return value * 100 if isinstance(value, (int, float)) else None


def _accuracy_vs_ttft(records, context, Figure, go):
    points = [r for r in records if _accuracy(r) is not None]
    if not points:
        return "no row has an accuracy (`ablate eval --db` stores one)"
    points.sort(key=lambda r: _number(r, "latency_ms.ttft"))
    title, x_label, y_label = "Accuracy vs TTFT", "TTFT (ms), lower is better", "exact match (%), higher is better"
    how_to_read = "Dashed: the Pareto front, the runs no other run beats with as high an accuracy at as low a TTFT."
    figure, axes = _new_figure(Figure, title, context, how_to_read)
    xs, ys = [_number(r, "latency_ms.ttft") for r in points], [_accuracy(r) for r in points]
    axes.scatter(xs, ys, color=COLORS[0], zorder=3)
    # Trained variants differ in their run folders (weights, tokenizer) and timing image too: name them by the rest.
    shown = [
        key
        for key in varying_keys(points)
        if not key.startswith("run.") and not any("/" in str(v) for r in points for v in cell_values(r, [key]).values())
    ]
    labels = [cell_label(r, shown) for r in points]
    for label, x, y in zip(labels, xs, ys):
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    front = [points[i] for i in pareto_front([(y, x) for x, y in zip(xs, ys)])]
    fx, fy = [_number(r, "latency_ms.ttft") for r in front], [_accuracy(r) for r in front]
    axes.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1, label="Pareto front")
    chances = {r["accuracy"].get("chance") for r in points} - {None}
    traces = [
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            name="runs",
            marker={"color": COLORS[0]},
            text=labels,
            hovertemplate="%{text}<br>TTFT %{x:.1f} ms<br>exact match %{y:.1f}%<extra></extra>",
        ),
        go.Scatter(
            x=fx, y=fy, mode="lines", line={"shape": "hv", "dash": "dash", "color": "black"}, name="Pareto front"
        ),
    ]
    if len(chances) == 1:  # one task: its chance level is a meaningful floor
        chance = chances.pop() * 100
        axes.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.1f}%)")
        traces.append(go.Scatter(x=[min(xs), max(xs)], y=[chance] * 2, mode="lines", name="chance"))
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_ylim(0, 105)
    _legend_below(figure)
    return figure, go.Figure(traces, _plotly_layout(go, title, context, x_label, y_label, how_to_read))


def _fidelity_vs_ttft(records, context, Figure, go):
    points = [r for r in records if _number(r, "fidelity.kl") is not None]
    if not points:
        return "no row has a fidelity (`--fidelity` measures one)"
    points.sort(key=lambda r: _number(r, "latency_ms.ttft"))
    title, x_label = "Fidelity vs TTFT", "TTFT (ms), lower is better"
    y_label = "first-token KL vs no reduction (nats), lower is better"
    how_to_read = "Dashed: the Pareto front, the runs no other run beats with as low a KL at as low a TTFT."
    figure, axes = _new_figure(Figure, title, context, how_to_read)
    xs, ys = [_number(r, "latency_ms.ttft") for r in points], [_number(r, "fidelity.kl") for r in points]
    axes.scatter(xs, ys, color=COLORS[0], zorder=3)
    labels = cell_labels(points)
    for label, x, y in zip(labels, xs, ys):
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    front = [points[i] for i in pareto_front([(-y, x) for x, y in zip(xs, ys)])]
    fx, fy = [_number(r, "latency_ms.ttft") for r in front], [_number(r, "fidelity.kl") for r in front]
    axes.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1, label="Pareto front")
    traces = [
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            name="runs",
            marker={"color": COLORS[0]},
            text=labels,
            hovertemplate="%{text}<br>TTFT %{x:.1f} ms<br>KL %{y:.4f}<extra></extra>",
        ),
        go.Scatter(
            x=fx, y=fy, mode="lines", line={"shape": "hv", "dash": "dash", "color": "black"}, name="Pareto front"
        ),
    ]
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    _legend_below(figure)
    return figure, go.Figure(traces, _plotly_layout(go, title, context, x_label, y_label, how_to_read))
