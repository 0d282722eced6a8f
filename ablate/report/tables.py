"""Tables of records for people: one run's stages (`ablate run`), rows of a results store (`ablate results`, a grid's
summary), a cell's headline figures, and CSV. Records are read in their JSON form (what the store holds), so a fresh
run and a stored row print alike."""

from __future__ import annotations

import csv
import json
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ablate.api.errors import first_line
from ablate.api.runtimes import TORCH_RUNTIME
from ablate.grid.store import record_path
from ablate.measurement.record import value_at
from ablate.model.vlm import STAGE_COMPONENT, STAGES
from ablate.report.results import Pivot, accuracy_columns, flat_rows, short_labels, value_of


def _ms(value: Any, digits: int = 1) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:,.{digits}f}"


def _num(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value / scale:,.{digits}f}"


def tokens_text(record: dict[str, Any]) -> str:
    """Visual tokens as a reader should take them: '<=82' when the count is an image-dependent reducer's bound."""
    text = _num(record.get("visual_tokens"))
    return f"<={text}" if record.get("count_basis") == "upper bound" else text


def headline(record: dict[str, Any]) -> str:
    """A cell's headline figures in a few words."""
    error = record.get("error")
    if error:
        return f"failed: {error.get('type')}: {first_line(error.get('message'), width=160)}"
    parts = [f"{tokens_text(record)} visual tokens"]
    ttft = value_at(record, "latency_ms.ttft")
    if ttft is not None:
        parts.insert(0, f"TTFT {_ms(ttft)} ms")
    flops = value_at(record, "flops.total")
    if flops is not None:
        parts.append(f"{flops / 1e9:,.1f} GFLOPs")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ one run


def print_record(record: dict[str, Any], out: Console) -> None:
    """One run's table: every stage's median, spread, tokens, FLOPs, parameters and roofline floor; then its notes."""
    run, used = record["run"], record["execution"]["used"]
    mode = used["mode"] or run["mode"]
    if used["mode"] and used["mode"] != run["mode"]:
        mode += f" (asked: {run['mode']})"
    if run.get("runtime", TORCH_RUNTIME) != TORCH_RUNTIME:  # records before runtimes have no run.runtime
        mode = f"in {run['runtime']}" + (" (some stages in torch)" if used.get("runtime") == "mixed" else "")
    quantized = [f"{scheme} {kind}" for kind, scheme in (run.get("quantize") or {}).items() if scheme]
    layout = f" {used['memory_format']}" if used["memory_format"] == "channels_last" else ""
    layout += "".join(f", {text}" for text in quantized)
    title = (
        f"{record['name']}: {tokens_text(record)} visual + {record['prompt_tokens']} prompt tokens, "
        f"{run['device']} {run['dtype']} {mode}{layout}, {run['threads']} threads"
    )
    table = Table(title=title, title_justify="left")
    columns = ("stage", "median ms", "min ms", "spread ms (IQR)", "tokens out", "GFLOPs", "params", "floor ms")
    for column in (*columns, "x floor"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    latency, spread_ms, fastest = record["latency_ms"], record["latency_spread_ms"], record["latency_min_ms"]
    flops, params, tokens = record["flops"], record["params"], record["tokens"]
    roof = record["roofline"]["stages"]

    def times(stage: str) -> tuple[str, str, str]:
        return _ms(latency[stage], 2), _ms(fastest[stage], 2), _ms(spread_ms[stage], 2)

    table.add_row("preprocess", *times("preprocess"), "", "", "", "-", "-")
    for stage in STAGES:
        gflops = flops.get(stage)
        table.add_row(
            stage,
            *times(stage),
            _num(tokens.get(stage)),
            "-" if gflops is None else f"{gflops / 1e9:,.2f}",
            _num(params.get(STAGE_COMPONENT[stage])),
            *_floor(roof.get(stage)),
        )
    table.add_section()
    total = flops.get("total")
    table.add_row(
        "stage sum",
        *times("stage_sum"),
        "",
        "-" if total is None else f"{total / 1e9:,.2f}",
        _num(params.get("total")),
        "",
        "",
    )
    table.add_row(
        "[bold]TTFT (one call)",
        f"[bold]{_ms(latency['ttft'], 2)}",
        _ms(fastest["ttft"], 2),
        _ms(spread_ms["ttft"], 2),
        f"{_num(tokens.get('llm_input'))} in",
        "",
        "",
        *_floor(roof.get("ttft")),
    )
    decode = record.get("decode")
    if decode:
        table.add_section()
        per_token, whole = decode["per_token_ms"], decode["end_to_end_ms"]
        table.add_row(
            f"decode step (x{decode['steps']})",
            _ms(per_token["median"], 2),
            _ms(per_token["min"], 2),
            _ms(per_token["spread"], 2),
            "1 out",
            "-" if decode.get("step_flops") is None else f"{decode['step_flops'] / 1e9:,.2f}",
            "",
            *_floor(roof.get("decode_step")),
        )
        table.add_row(
            f"[bold]{decode['max_new_tokens']} tokens (one call)",
            f"[bold]{_ms(whole['median'], 2)}",
            _ms(whole["min"], 2),
            _ms(whole["spread"], 2),
            f"{decode['max_new_tokens']} out",
            "",
            "",
            "-",
            "-",
        )
    out.print(table)
    if decode:
        _print_decode(record, out)
    timing, memory = record["timing"], record["memory"]
    if timing["repeats"]:
        stop = "" if timing["stop"] == "repeats" else f", until {timing['stop']}"
        busy = "" if timing["busy_share"] is None else f", other processes {timing['busy_share']:.0%} of the CPUs"
        out.print(
            f"medians of {timing['repeats']} repeats after {run['warmup']} warm-up{stop} "
            f"({timing['seconds']:,.1f} s{busy})",
            highlight=False,
        )
    if record["peak_memory_mb"] is not None:
        out.print(
            f"peak memory: {record['peak_memory_mb']:,.1f} MB allocated by the run, above the process's "
            f"{memory['baseline_mb']:,.0f} MB at its start",
            highlight=False,
        )
    for flag in timing["flags"]:
        out.print(f"[yellow]flag ({flag['kind']}): {escape(flag['message'])}[/]", highlight=False)
    fidelity = record.get("fidelity")
    if fidelity:
        out.print(
            f"fidelity vs the model without its reducer: top-1 agreement {fidelity['top1_agreement']:.3f}, "
            f"KL {fidelity['kl']:.4g} nats ({fidelity['rows']} rows)"
        )
    quantization = record.get("quantization")
    if quantization:
        sizes = ", ".join(
            f"{kind} {quantization['float_bytes'][kind] / 2**20:,.1f} -> {quantization['quantized_bytes'][kind] / 2**20:,.1f} "
            f"MiB ({scheme})"
            for kind, scheme in quantization["schemes"].items()
        )
        fidelity = quantization["fidelity"]
        out.print(
            f"quantized weights: {sizes}; vs unquantized: top-1 agreement {fidelity['top1_agreement']:.3f}, "
            f"KL {fidelity['kl']:.4g} nats",
            highlight=False,
        )
    deviations = record["execution"].get("deviation_from_eager") or {}
    if run.get("runtime", TORCH_RUNTIME) != TORCH_RUNTIME and deviations:
        where = record["execution"].get("runtimes") or {}
        out.print(
            "ran in: "
            + ", ".join(
                f"{stage} {where.get(stage, '?')}" + ("" if value is None else f" ({value:.1e} from eager)")
                for stage, value in deviations.items()
            ),
            highlight=False,
        )
    for note in record["notes"]:
        out.print(f"note: {note}", highlight=False)
    if record["profile"]:
        _print_profile(record["profile"], out)


def _print_decode(record: dict[str, Any], out: Console) -> None:
    """The decode figures beside the table: the split's prediction, throughput and the KV cache."""
    decode, rate, cache = record["decode"], record["throughput"], record.get("kv_cache")
    per_token = decode["per_token_ms"]
    out.print(
        f"decode: {decode['max_new_tokens']} tokens, fixed length (no stop at EOS), {decode['cache']}, "
        f"{decode['mode']}; per token median {_ms(per_token['median'], 2)} ms, p90 {_ms(per_token['p90'], 2)} ms; "
        f"TTFT + {decode['steps']} x median = {_ms(decode['predicted_end_to_end_ms'], 1)} ms vs "
        f"{_ms(decode['end_to_end_ms']['median'], 1)} ms measured",
        highlight=False,
    )
    out.print(
        f"throughput (batch {record['batch_size']}): {_num(rate['images_per_s'], digits=2)} images/s to the first "
        f"token, {_num(rate['output_tokens_per_s'], digits=1)} output tokens/s end to end, "
        f"{_num(rate['decode_tokens_per_s'], digits=1)} tokens/s decoding",
        highlight=False,
    )
    if cache:
        pruned = (
            f", layers {cache['layers'] - cache['pruned_layers']}..{cache['layers'] - 1} hold "
            f"{cache['pruned_layer_tokens']} (unpruned {_num(cache['unpruned_bytes'], 2**20, 2)} MiB)"
            if cache["pruned_layers"]
            else ""
        )
        out.print(
            f"KV cache: {_num(cache['bytes_per_token'], 2**10, 1)} KiB per token x {cache['tokens']} tokens{pruned} = "
            f"{_num(cache['bytes'], 2**20, 2)} MiB for the batch (measured {_num(cache['measured_bytes'], 2**20, 2)} "
            f"MiB; after the prefill {_num(cache['prefill_bytes'], 2**20, 2)} MiB)",
            highlight=False,
        )


def _floor(figures: dict[str, Any] | None) -> tuple[str, str]:
    """The roofline columns: floor ms and measured / floor (with a launch-bound mark)."""
    if not figures or figures["floor_ms"] is None:
        return "-", "-"
    times = "-" if figures["measured_over_floor"] is None else f"{figures['measured_over_floor']:,.1f}"
    if figures.get("launch_bound"):
        times += " launch-bound"
    return f"{figures['floor_ms']:,.3f}", times


def _print_profile(profile: dict[str, Any], out: Console) -> None:
    table = Table(title=f"top kernels per stage (trace: {profile['trace']})", title_justify="left")
    for column in ("stage", "kernel / operator", "self ms", "calls", "share"):
        table.add_column(column, justify="left" if column in ("stage", "kernel / operator") else "right")
    for stage, rows in profile["top"].items():
        for index, row in enumerate(rows):
            name = row["name"] if len(row["name"]) <= 70 else row["name"][:67] + "..."
            table.add_row(
                stage if index == 0 else "", name, _ms(row["self_ms"], 2), str(row["calls"]), f"{row['share']:.0%}"
            )
        table.add_section()
    out.print(table)


# ------------------------------------------------------------------------------------------ stored rows


def rows_table(rows: list, title: str, skipped: set[str] = frozenset(), show_key: bool = False) -> Table:
    """One line per stored row: its cell (a short label: only what varies across the rows), status and figures
    (count-only and failed rows show '-'). A figure column no row has a value in is left out, and so is the error
    column when no row failed."""
    table = Table(title=escape(title), title_justify="left")
    columns = ["#"] + (["key"] if show_key else []) + ["cell", "status", "visual tok", "TTFT ms", "encoder ms"]
    columns += ["prefill ms", "ms/token", "tokens/s", "GFLOPs", "params M", "peak MB", "flags"]
    accuracy = accuracy_columns(rows)
    columns += [column_header(path) for path in accuracy] + ["error"]
    labels = short_labels(rows)
    lines = []
    for index, row in enumerate(rows, 1):
        record, error = row.record, row.record.get("error")
        status = "failed" if error else "ok"
        if row.key in skipped:
            status += " (stored)"
        cells = [str(index)] + ([row.key[:10]] if show_key else []) + [escape(labels[row.key])]
        cells += [
            f"[red]{status}[/]" if error else status,
            tokens_text(record),
            _ms(value_at(record, "latency_ms.ttft")),
            _ms(value_at(record, "latency_ms.encoder")),
            _ms(value_at(record, "latency_ms.prefill")),
            _ms(value_at(record, "decode.per_token_ms.median")),
            _num(value_at(record, "throughput.output_tokens_per_s"), digits=1),
            _num(value_at(record, "flops.total"), 1e9, 1),
            _num(value_at(record, "params.total"), 1e6, 1),
            _num(record.get("peak_memory_mb")),
            ",".join(flag.get("kind") or "?" for flag in value_at(record, "timing.flags") or []),
            *(cell_text(row, path) for path in accuracy),
            # short enough for one line beside the rest; `--columns label,error` and --jsonl show more
            escape(first_line(f"{error.get('type')}: {error.get('message')}", width=45)) if error else "",
        ]
        lines.append(cells)
    named = {"#", "key", "cell", "status"}  # what names a row: always shown
    shown = [
        i for i, column in enumerate(columns) if column in named or any(line[i] not in ("-", "") for line in lines)
    ]
    for i in shown:
        table.add_column(
            columns[i], justify="left" if columns[i] in ("cell", "status", "flags", "error", "key") else "right"
        )
    for line in lines:
        table.add_row(*(line[i] for i in shown))
    return table


def write_csv(rows: list, handle, columns: list[str] | None = None) -> None:
    """One line per row: key, label, status, then every record field flattened with dots (lists as JSON); or only
    `columns` (see `ablate.report.results`)."""
    flat = flat_rows(rows, columns)
    fields = list(dict.fromkeys(column for line in flat for column in line)) if columns is None else columns
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    for line in flat:
        writer.writerow(
            {key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in line.items()}
        )


# ------------------------------------------------------------------------------------ chosen columns, pivots

_HEADERS = {
    "label": "cell",
    "visual_tokens": "visual tok",
    "latency_ms.ttft": "TTFT ms",
    "flops.total": "GFLOPs",
    "params.total": "params M",
    "peak_memory_mb": "peak MB",
    "decode.per_token_ms.median": "ms/token",
    "throughput.output_tokens_per_s": "tokens/s",
    "kv_cache.bytes": "KV bytes",
    "accuracy.exact_match": "exact match",
    "accuracy.anls": "ANLS",
    "accuracy.n": "scored",
}
_UNITS = {"latency_ms": ("ms", 1.0, 1), "latency_spread_ms": ("IQR ms", 1.0, 1), "flops": ("GFLOPs", 1e9, 1)}
_UNITS["params"] = ("params M", 1e6, 1)


def column_header(path: str) -> str:
    """What a table heads a column with: a short name with its unit for the figures, else the path as given."""
    resolved = record_path(path)
    block, _, field = resolved.partition(".")
    if resolved in _HEADERS or path in _HEADERS:
        return _HEADERS.get(resolved) or _HEADERS[path]
    if block in _UNITS and field and "." not in field:
        return f"{field} {_UNITS[block][0]}"
    return path


def cell_text(row, path: str, labels: dict[str, str] | None = None) -> str:
    """A row's value at `path` as a table shows it: figures in the column's unit, '-' where there is none."""
    record, resolved = row.record, record_path(path)
    value = value_of(row, path, labels)
    if resolved == "visual_tokens":
        return tokens_text(record)
    if resolved == "error":
        return f"{value.get('type')}: {first_line(value.get('message'), width=90)}" if value else ""
    if value is None:
        return "-"
    block = resolved.partition(".")[0]
    if block in _UNITS and isinstance(value, (int, float)) and not isinstance(value, bool):
        _, scale, digits = _UNITS[block]
        return _num(value, scale, digits)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _numeric(values: list) -> bool:
    return any(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)


def columns_table(rows: list, columns: list[str], title: str) -> Table:
    """One line per row, the chosen columns (paths into the record, or key / label / status)."""
    labels = short_labels(rows)
    table = Table(title=escape(title), title_justify="left")
    table.add_column("#", justify="right")
    for path in columns:
        values = [value_of(row, path, labels) for row in rows]
        table.add_column(escape(column_header(path)), justify="right" if _numeric(values) else "left")
    for index, row in enumerate(rows, 1):
        texts = [escape(cell_text(row, path, labels)) for path in columns]
        table.add_row(str(index), *(f"[red]{text}[/]" if text == "failed" else text for text in texts))
    return table


def pivot_table(layout: Pivot, title: str) -> Group:
    """A pivot: one line per value of its row paths, one column per value of its column path, its value in the cells
    ('failed' where that cell failed, '-' where it has no value, empty where no row is)."""
    title = f"{column_header(layout.value)} by {' + '.join(layout.index)} (lines) and {layout.column}; {title}"
    table = Table()
    for path in layout.index:
        table.add_column(escape(path), justify="left")
    for key in layout.column_keys:
        table.add_column(escape(f"{key}"), justify="right")
    for row_key in layout.row_keys:
        texts = []
        for column_key in layout.column_keys:
            row = layout.cells.get((row_key, column_key))
            if row is None:
                texts.append("")
            elif row.status == "failed":
                texts.append("[red]failed[/]")
            else:
                texts.append(escape(cell_text(row, layout.value)))
        table.add_row(*(escape("-" if item is None else str(item)) for item in row_key), *texts)
    return Group(Text(title), table)  # the title above, not wrapped to the width of a narrow table
