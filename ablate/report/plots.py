"""Plots of stored results: a PNG (matplotlib) and an interactive HTML file (plotly) of each.

    ttft_vs_tokens          TTFT against visual tokens, one series per system, with the Pareto front (the cells no
                            other cell beats with as many tokens or more in as little time or less)
    stage_latency           per-stage latency (encoder, reducer, connector, LLM prefill) stacked, one bar per cell
    encoder_vs_resolution   encoder latency against input resolution, one line per encoder
    accuracy_vs_ttft        exact-match accuracy against TTFT with the Pareto front, for rows `ablate eval --db`
                            stored (a trained variant's accuracy and timing in one record)

Systems and cells are named by the config keys that differ between the rows plotted, so any grid labels itself.
Rows without timings (count-only or failed cells) are left out; a plot with nothing to show is skipped and said so.
Titles name the device, dtype and execution mode the figures come from. Needs `pip install 'ablate-vlm[plot]'`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.api.errors import ConfigError
from ablate.model.vlm import STAGES
from ablate.report.tables import flatten
from ablate.version import DISTRIBUTION

STAGE_NAMES = {"encoder": "encoder", "reducer": "reducer", "connector": "connector", "prefill": "LLM prefill"}
RESOLUTION_KEY = "encoder.image_size"
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")


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


@dataclass
class Point:
    record: dict[str, Any]
    label: str  # the cell: the varying keys
    series: str  # the system it belongs to: the varying keys other than the x axis's

    def latency(self, stage: str) -> float:
        return (self.record.get("latency_ms") or {}).get(stage) or 0.0


def _timed(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        record
        for record in records
        if not record.get("error") and isinstance((record.get("latency_ms") or {}).get("ttft"), (int, float))
    ]


def _varying(records: list[dict[str, Any]]) -> list[str]:
    """Config keys whose value differs between records (run options included), in config order."""
    flat = [flatten(record.get("config") or {}) for record in records]
    keys = list(dict.fromkeys(key for config in flat for key in config))
    return [key for key in keys if len({repr(config.get(key)) for config in flat}) > 1]


def _describe(record: dict[str, Any], keys: list[str], fallback: str) -> str:
    config = flatten(record.get("config") or {})
    text = ", ".join(f"{key}={config.get(key)}" for key in keys)
    return text or fallback


def resolution(record: dict[str, Any]) -> int | None:
    config = flatten(record.get("config") or {})
    if isinstance(config.get(RESOLUTION_KEY), int):
        return config[RESOLUTION_KEY]
    return (record.get("image") or {}).get("width")


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
    """Indices of the (value, ttft) points, more value being better (visual tokens, accuracy), that no other point
    beats: as much value or more in as little time or less, and strictly better in one. In order of TTFT."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front, best_tokens = [], float("-inf")
    for index in order:
        if points[index][0] > best_tokens:
            front.append(index)
            best_tokens = points[index][0]
    return front


def _points(records: list[dict[str, Any]], series_keys_of) -> list[Point]:
    varying = _varying(records)
    return [
        Point(
            record,
            _describe(record, varying, record.get("name") or "?"),
            _describe(record, series_keys_of(varying), record.get("name") or "?"),
        )
        for record in records
    ]


def write_plots(
    records: Iterable[dict[str, Any]], out: str | Path, plotly_js: str | bool = "directory"
) -> tuple[list[Path], list[str]]:
    """Write every plot that has data as OUT/NAME.png and OUT/NAME.html; returns (files, notes on skipped plots).

    `plotly_js`: how the HTML gets plotly.js ('directory': one shared plotly.min.js beside the files, works offline;
    'cdn': a link, for pages viewed online; True: embedded in each file)."""
    Figure, FigureCanvasAgg, go = _libraries()
    records = list(records)
    timed = _timed(records)
    out = Path(out)
    if not records:
        raise ConfigError(
            "No rows to plot: the store (or the filter) holds none. Run a grid first, or loosen the filter."
        )
    if not timed:
        raise ConfigError(
            f"None of the {len(records)} rows has timings to plot (count-only or failed cells only). Run the grid "
            f"without --count-only."
        )
    out.mkdir(parents=True, exist_ok=True)
    context = title_context(timed)
    files: list[Path] = []
    notes: list[str] = []
    for name, make in (
        ("ttft_vs_tokens", _ttft_vs_tokens),
        ("stage_latency", _stage_latency),
        ("encoder_vs_resolution", _encoder_vs_resolution),
        ("accuracy_vs_ttft", _accuracy_vs_ttft),
    ):
        made = make(timed, context, Figure, go)
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


# ---------------------------------------------------------------------------------------------- the plots


def _new_figure(Figure, title: str, context: str, height: float = 4.5):
    figure = Figure(figsize=(7.5, height))
    axes = figure.add_subplot()
    axes.set_title(f"{title}\n{context}", fontsize=10)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _plotly_layout(go, title: str, context: str, x: str, y: str, **extra) -> Any:
    return go.Layout(
        title={"text": f"{title}<br><sup>{context}</sup>"},
        xaxis={"title": {"text": x}},
        yaxis={"title": {"text": y}},
        template="plotly_white",
        **extra,
    )


def _series(points: list[Point]) -> dict[str, list[Point]]:
    groups: dict[str, list[Point]] = {}
    for point in points:
        groups.setdefault(point.series, []).append(point)
    return groups


def _ttft_vs_tokens(records, context, Figure, go):
    points = [
        p
        for p in _points(records, lambda keys: [k for k in keys if k != RESOLUTION_KEY])
        if isinstance(p.record.get("visual_tokens"), int)
    ]
    if not points:
        return "no timed row has a fixed number of visual tokens"
    title, x_label, y_label = "TTFT vs visual tokens", "visual tokens (per image)", "TTFT (ms)"
    figure, axes = _new_figure(Figure, title, context)
    traces = []
    for index, (series, members) in enumerate(_series(points).items()):
        members = sorted(members, key=lambda p: p.record["visual_tokens"])
        xs = [p.record["visual_tokens"] for p in members]
        ys = [p.latency("ttft") for p in members]
        color = COLORS[index % len(COLORS)]
        axes.plot(xs, ys, "o-", color=color, label=series, alpha=0.85)
        for p, x, y in zip(members, xs, ys):
            if resolution(p.record):
                axes.annotate(
                    f"{resolution(p.record)} px", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7
                )
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=series,
                marker={"color": color},
                text=[p.label for p in members],
                hovertemplate="%{text}<br>%{x} visual tokens<br>TTFT %{y:.1f} ms<extra></extra>",
            )
        )
    front = [points[i] for i in pareto_front([(p.record["visual_tokens"], p.latency("ttft")) for p in points])]
    fx, fy = [p.record["visual_tokens"] for p in front], [p.latency("ttft") for p in front]
    axes.step(fx, fy, where="pre", color="black", linestyle="--", linewidth=1, label="Pareto front")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.legend(fontsize=7)
    traces.append(
        go.Scatter(
            x=fx, y=fy, mode="lines", line={"shape": "vh", "dash": "dash", "color": "black"}, name="Pareto front"
        )
    )
    return figure, go.Figure(traces, _plotly_layout(go, title, context, x_label, y_label))


def _stage_latency(records, context, Figure, go):
    points = sorted(_points(records, lambda keys: keys), key=lambda p: p.latency("ttft"))
    title, x_label = "Latency per stage", "latency (ms), median over repeats"
    figure, axes = _new_figure(Figure, title, context, height=max(2.5, 1.2 + 0.35 * len(points)))
    labels = [p.label for p in points]
    left = [0.0] * len(points)
    traces = []
    for index, stage in enumerate(STAGES):
        widths = [p.latency(stage) for p in points]
        color = COLORS[index % len(COLORS)]
        axes.barh(labels, widths, left=left, color=color, label=STAGE_NAMES[stage])
        traces.append(go.Bar(y=labels, x=widths, name=STAGE_NAMES[stage], orientation="h", marker={"color": color}))
        left = [a + b for a, b in zip(left, widths)]
    axes.scatter([p.latency("ttft") for p in points], labels, marker="|", s=200, color="black", label="TTFT", zorder=3)
    axes.set_xlabel(x_label)
    axes.tick_params(axis="y", labelsize=7)
    axes.legend(fontsize=7, loc="lower right")
    layout = _plotly_layout(go, title, context, x_label, "", barmode="stack", height=max(300, 120 + 28 * len(points)))
    return figure, go.Figure(traces, layout)


def _encoder_vs_resolution(records, context, Figure, go):
    def encoder_keys(keys):
        chosen = [k for k in keys if k.startswith("encoder.") and k != RESOLUTION_KEY]
        return chosen or ["encoder.name"]

    points = [p for p in _points(records, encoder_keys) if resolution(p.record)]
    if len({resolution(p.record) for p in points}) < 2:
        return "the rows span fewer than two input resolutions"
    title, x_label, y_label = (
        "Encoder latency vs input resolution",
        "input resolution (px, square side)",
        "encoder latency (ms)",
    )
    figure, axes = _new_figure(Figure, title, context)
    traces = []
    for index, (series, members) in enumerate(_series(points).items()):
        by_size: dict[int, float] = {}
        for p in members:  # several cells of one encoder at one size (other keys varied): their fastest
            size = resolution(p.record)
            by_size[size] = min(by_size.get(size, float("inf")), p.latency("encoder"))
        xs = sorted(by_size)
        ys = [by_size[x] for x in xs]
        color = COLORS[index % len(COLORS)]
        axes.plot(xs, ys, "o-", color=color, label=series)
        traces.append(go.Scatter(x=xs, y=ys, mode="lines+markers", name=series, marker={"color": color}))
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.legend(fontsize=7)
    return figure, go.Figure(traces, _plotly_layout(go, title, context, x_label, y_label))


def _accuracy(record: dict[str, Any]) -> float | None:
    accuracy = record.get("accuracy")  # `ablate eval`'s block; other shapes (a plugin's own field) are not plotted
    value = accuracy.get("exact_match") if isinstance(accuracy, dict) else None
    return value * 100 if isinstance(value, (int, float)) else None


def _accuracy_vs_ttft(records, context, Figure, go):
    points = [p for p in _points(records, lambda keys: []) if _accuracy(p.record) is not None]
    if not points:
        return "no row has an accuracy (`ablate eval --db` stores one)"
    points.sort(key=lambda p: p.latency("ttft"))
    title, x_label, y_label = "Accuracy vs TTFT", "TTFT (ms)", "exact match (%)"
    figure, axes = _new_figure(Figure, title, context)
    xs, ys = [p.latency("ttft") for p in points], [_accuracy(p.record) for p in points]
    axes.scatter(xs, ys, color=COLORS[0], zorder=3)
    # Trained variants differ in their run folders (weights, tokenizer) and timing image too: name them by the rest.
    flat = [flatten(p.record.get("config") or {}) for p in points]
    shown = [
        key
        for key in _varying([p.record for p in points])
        if not key.startswith("run.") and not any("/" in str(config.get(key, "")) for config in flat)
    ]
    labels = [_describe(p.record, shown, p.label) for p in points]
    for label, x, y in zip(labels, xs, ys):
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    front = [points[i] for i in pareto_front([(y, x) for x, y in zip(xs, ys)])]
    fx, fy = [p.latency("ttft") for p in front], [_accuracy(p.record) for p in front]
    axes.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1, label="Pareto front")
    chances = {p.record["accuracy"].get("chance") for p in points} - {None}
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
    axes.legend(fontsize=7)
    return figure, go.Figure(traces, _plotly_layout(go, title, context, x_label, y_label))
