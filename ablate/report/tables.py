"""Tables of records for people: one run's stages (`ablate run`), rows of a results store (`ablate results`, a grid's
summary), a cell's headline figures, and CSV. Records are read in their JSON form (what the store holds), so a fresh
run and a stored row print alike."""

from __future__ import annotations

import csv
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ablate.api.errors import first_line
from ablate.measurement.record import metrics, value_at
from ablate.model.vlm import STAGE_COMPONENT, STAGES


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
    layout = f" {used['memory_format']}" if used["memory_format"] == "channels_last" else ""
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
    out.print(table)
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
    for note in record["notes"]:
        out.print(f"note: {note}", highlight=False)
    if record["profile"]:
        _print_profile(record["profile"], out)


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
    """One line per stored row: its cell, status and figures (count-only and failed rows show '-')."""
    table = Table(title=escape(title), title_justify="left")
    columns = ["#"] + (["key"] if show_key else []) + ["cell", "status", "visual tok", "TTFT ms", "encoder ms"]
    columns += ["prefill ms", "GFLOPs", "params M", "peak MB", "flags", "error"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("cell", "status", "flags", "error", "key") else "right")
    for index, row in enumerate(rows, 1):
        record, error = row.record, row.record.get("error")
        status = "failed" if error else "ok"
        if row.key in skipped:
            status += " (stored)"
        cells = [str(index)] + ([row.key[:10]] if show_key else []) + [escape(row.label or record.get("name") or "-")]
        cells += [
            f"[red]{status}[/]" if error else status,
            tokens_text(record),
            _ms(value_at(record, "latency_ms.ttft")),
            _ms(value_at(record, "latency_ms.encoder")),
            _ms(value_at(record, "latency_ms.prefill")),
            _num(value_at(record, "flops.total"), 1e9, 1),
            _num(value_at(record, "params.total"), 1e6, 1),
            _num(record.get("peak_memory_mb")),
            ",".join(flag.get("kind") or "?" for flag in value_at(record, "timing.flags") or []),
            escape(f"{error.get('type')}: {first_line(error.get('message'), width=90)}") if error else "",
        ]
        table.add_row(*cells)
    return table


def flatten(tree: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def write_csv(rows: list, handle) -> None:
    """One line per row: key, label, status, then every record field flattened with dots (lists as JSON)."""
    flat = [
        {"key": row.key, "label": row.label, "status": metrics(row.record)["status"], **flatten(row.record)}
        for row in rows
    ]
    columns = list(dict.fromkeys(column for line in flat for column in line))
    writer = csv.DictWriter(handle, fieldnames=columns)
    writer.writeheader()
    for line in flat:
        writer.writerow(
            {key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in line.items()}
        )
