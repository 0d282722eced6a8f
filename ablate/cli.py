"""`ablate` command line: run, show, list, plugins."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ablate.errors import AblateError

# Results go to stdout (exactly one JSON object with --json); everything for people goes to stderr.
# Piped output (logs, CI) gets wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except AblateError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ablate", description="Swap, time and count the parts of a VLM.")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="build a config and time every stage and TTFT")
    run.add_argument("config", help="preset name (see experiments/) or YAML path")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. encoder.image_size=512 encoder=timm")
    run.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    run.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default 2)")
    run.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are reported (default 5)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    run.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--mode", default="eager", help="execution mode, recorded as env.mode (default eager)")
    run.add_argument("--count-only", action="store_true", help="tokens, params, FLOPs on the meta device; no weights")
    run.add_argument("--image", default=None, help="a real image file instead of the synthetic one")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(handler=cmd_run)

    show = sub.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(handler=cmd_show)

    lst = sub.add_parser("list", help="list components with descriptions and options")
    lst.add_argument("kind", nargs="?", help="encoder, reducer, connector or decoder (default: all)")
    lst.set_defaults(handler=cmd_list)

    plugins = sub.add_parser("plugins", help="list plugins, their versions, components and load errors")
    plugins.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of failed plugins")
    plugins.set_defaults(handler=cmd_plugins)
    return parser


# ---------------------------------------------------------------------------------------------- run


def cmd_run(args) -> int:
    from ablate.measure import RunOptions, measure

    options = RunOptions(
        warmup=args.warmup, repeats=args.repeats, device=args.device, dtype=args.dtype, threads=args.threads,
        mode=args.mode, count_only=args.count_only, image=args.image, seed=args.seed,
    )
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True,
    ) as bar:
        task = bar.add_task("loading", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        record = measure(args.config, args.overrides, options, progress)
    if args.json:
        print(json.dumps(record))
    else:
        print_record(record)
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def print_record(record: dict[str, Any]) -> None:
    env = record["env"]
    title = (
        f"{record['name']}: {_num(record['visual_tokens'])} visual + {record['prompt_tokens']} prompt tokens, "
        f"{env['device']} {env['dtype']} {env['mode']}, {env['threads']} threads"
    )
    table = Table(title=title, title_justify="left")
    for column in ("stage", "median ms", "spread ms (IQR)", "GFLOPs", "params"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    latency, spread_ms = record["latency_ms"], record["latency_spread_ms"]
    flops, params = record["flops"] or {}, record["params"] or {}
    for stage, param_key in (("preprocess", None), ("encoder", "encoder"), ("reducer", "reducer"),
                             ("connector", "connector"), ("prefill", "decoder")):
        gflops = flops.get(stage)
        table.add_row(stage, _ms(latency[stage]), _ms(spread_ms[stage]),
                      "-" if gflops is None else f"{gflops / 1e9:,.2f}",
                      _num(params.get(param_key)) if param_key else "")
    table.add_section()
    total = flops.get("total")
    table.add_row("stage sum", _ms(latency["stage_sum"]), _ms(spread_ms["stage_sum"]),
                  "-" if total is None else f"{total / 1e9:,.2f}", _num(params.get("total")))
    table.add_row("[bold]TTFT (one call)", f"[bold]{_ms(latency['ttft'])}", _ms(spread_ms["ttft"]), "", "")
    out.print(table)
    if record["count_only"]:
        out.print("count only: no weights were allocated and nothing was timed.")
    elif latency["ttft"]:
        gap = (latency["stage_sum"] - latency["ttft"]) / latency["ttft"] * 100
        out.print(f"stage sum vs TTFT: {gap:+.1f}%   peak memory: {record['peak_memory_mb']:,.0f} MB   "
                  f"medians of {record['repeats']} repeats after {record['warmup']} warm-up")


# ---------------------------------------------------------------------------------------------- show, list


def cmd_show(args) -> int:
    from ablate.config import load_config

    config = load_config(args.config, args.overrides)
    out.print(config.to_yaml(), highlight=False, end="")
    return 0


def _options(config_cls) -> str:
    parts = []
    for f in dataclasses.fields(config_cls):
        if f.name == "name":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        parts.append(f"{f.name}={default!r}")
    return ", ".join(parts)


def cmd_list(args) -> int:
    from ablate.components import describe
    from ablate.registry import KINDS, get_registry

    registry = get_registry()
    if args.kind and args.kind.rstrip("s") not in KINDS:
        raise AblateError(f"Unknown component kind '{args.kind}'. Kinds: {', '.join(KINDS)}.")
    kinds = [args.kind.rstrip("s")] if args.kind else list(KINDS)
    for kind in kinds:
        table = Table(title=f"{kind}s", title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("plugin")
        table.add_column("description")
        table.add_column("options")
        for name in registry.names(kind):
            cls = registry.components[kind][name]
            table.add_row(name, registry.owner[(kind, name)], describe(cls), _options(cls.Config))
        out.print(table)
    broken = [p for p in registry.plugins.values() if p.error]
    if broken:
        err.print(f"[yellow]{len(broken)} plugin(s) failed to load: {', '.join(p.name for p in broken)}. "
                  f"Run `ablate plugins` for details.[/]")
    return 0


def cmd_plugins(args) -> int:
    from ablate.registry import get_registry

    registry = get_registry()
    table = Table(title="plugins (entry-point group 'ablate')", title_justify="left")
    for column in ("plugin", "module", "version", "registers", "status"):
        table.add_column(column)
    for info in sorted(registry.plugins.values(), key=lambda p: p.name):
        registers = ", ".join(f"{kind} {name}" for kind, name in info.components)
        status = f"[red]error: {info.error}[/]" if info.error else "[green]ok[/]"
        table.add_row(info.name, info.module, info.version or "-", registers or "-", status)
    out.print(table)
    if args.verbose:
        for info in registry.plugins.values():
            if info.error and info.traceback:
                err.print(f"[bold]{info.name}[/]\n{info.traceback}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
