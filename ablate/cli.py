"""`ablate` command line: run, show, list, plugins, data, train, eval.

Results go to stdout (with --json, exactly one JSON object, also on failure); everything for people goes to stderr.
Bad input exits with code 2 and one paragraph that names the fix; an unexpected failure exits with 1, naming the
plugin (or ablate) and the log file holding the traceback (--debug prints it); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ablate.errors import EXIT_INTERRUPTED, AblateError, ConfigError, UsageError, unexpected

# Piped output (logs, CI) gets wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)
DEFAULT_DB = "results/ablate.db"  # `ablate grid`, `results` and `plot` share one store unless --db says otherwise


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is a UsageError (one paragraph, exit 2, a JSON record with --json)."""

    def error(self, message: str):
        raise UsageError(f"{message}. Run `{self.prog} --help` for the arguments.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_json, debug = "--json" in argv, "--debug" in argv
    parser = build_parser()
    try:
        try:
            args, extra = parser.parse_known_args(argv)
            # Overrides may come after flags (`ablate run tiny --count-only encoder.image_size=512`).
            overrides = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
            if extra and (len(overrides) < len(extra) or not hasattr(args, "overrides")):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            if overrides:
                args.overrides = args.overrides + overrides
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return 2
        return args.handler(args)
    except KeyboardInterrupt as exc:
        _report(exc, "Interrupted (Ctrl-C); nothing was lost that was already measured.", wants_json, debug)
        return EXIT_INTERRUPTED
    except AblateError as exc:
        _report(exc, str(exc), wants_json, debug)
        return exc.exit_code
    except Exception as exc:  # a bug somewhere: say whose, keep the traceback out of the user's way
        from ablate.registry import get_registry

        wrapped = unexpected(exc, f"running `ablate {' '.join(argv[:1])}`", get_registry().plugin_in_traceback(exc))
        wrapped.__cause__ = exc
        _report(wrapped, str(wrapped), wants_json, debug)
        return wrapped.exit_code


def _report(exc: BaseException, message: str, wants_json: bool, debug: bool) -> None:
    if wants_json:
        from ablate.record import empty_record, error_entry

        record = getattr(exc, "record", None)
        if record is None:
            record = empty_record()
            record["error"] = error_entry(exc, None)
        print(json.dumps(record))
    if debug:
        original = exc.__cause__ or exc
        err.print("".join(traceback.format_exception(original)), highlight=False, markup=False)
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # `ablate[plot]` is text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ablate", description="Swap, time and count the parts of a VLM.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="build a config and time every stage and TTFT")
    run.add_argument("config", help="preset name (`ablate list presets`), YAML path or checkpoint directory")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. encoder.image_size=512 encoder=timm")
    run.add_argument("--json", action="store_true", help="print exactly one JSON object (the record) on stdout")
    run.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    _add_run_flags(run)
    run.add_argument("--wandb", action="store_true", help="log the run to W&B (also: `wandb: true` in the config)")
    run.add_argument(
        "--profile",
        nargs="?",
        const="auto",
        metavar="TRACE",
        help="write a torch.profiler trace (Perfetto) and print the top kernels per stage (run.profile; default "
        "file: ablate-trace-NAME-MODE.json)",
    )
    run.set_defaults(handler=cmd_run)

    grid = sub.add_parser("grid", help="run a grid of configs into a results store (sweeps: key=a,b,c)")
    grid.add_argument("config", help="a grid file (experiments/grids/*.yaml), or any config to sweep from")
    grid.add_argument("overrides", nargs="*", help="key=a,b,c sweeps a key; key=value sets it in every cell")
    grid.add_argument("--db", default=DEFAULT_DB, help=f"the SQLite results store (default {DEFAULT_DB})")
    grid.add_argument("--dry-run", action="store_true", help="list the cells (and which the store holds); run none")
    grid.add_argument("--rerun", action="store_true", help="measure every cell again, even those the store holds")
    grid.add_argument("--retry-failed", action="store_true", help="measure again the cells stored as failed")
    grid.add_argument("--launcher", default="local", help="local (default), submitit (SLURM) or ray")
    grid.add_argument("--workers", type=int, default=1, help="cells at once: local worker processes, Ray CPUs, jobs")
    grid.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="submitit executor parameter")
    grid.add_argument("--name", help="the grid's name (default: the grid file's name or the config's)")
    grid.add_argument("--wandb", action="store_true", help="one W&B run per cell and one for the grid")
    grid.add_argument("--json", action="store_true", help="print the grid's records as JSON lines on stdout")
    grid.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    _add_run_flags(grid)
    grid.set_defaults(handler=cmd_grid)

    results = sub.add_parser("results", help="show stored results (filters: encoder=NAME 'visual_tokens<=256' ...)")
    results.add_argument("overrides", nargs="*", metavar="FILTER", help="PATH=VALUE (or != < <= > >=) on the record")
    results.add_argument("--db", default=DEFAULT_DB, help=f"the SQLite results store (default {DEFAULT_DB})")
    results.add_argument("--grid", help="only this grid's cells, in grid order (ids: see `ablate results --grids`)")
    results.add_argument("--grids", action="store_true", help="list the grids in the store")
    results.add_argument("--status", choices=("ok", "failed"), help="only ok or only failed cells")
    results.add_argument("--jsonl", action="store_true", help="print one JSON record per row on stdout")
    results.add_argument(
        "--csv", metavar="FILE", help="write the rows as CSV, one column per record field (- for stdout)"
    )
    results.set_defaults(handler=cmd_results)

    plot = sub.add_parser("plot", help="plot stored results as PNG and interactive HTML")
    plot.add_argument("overrides", nargs="*", metavar="FILTER", help="PATH=VALUE filters, as for `ablate results`")
    plot.add_argument("--db", default=DEFAULT_DB, help=f"the SQLite results store (default {DEFAULT_DB})")
    plot.add_argument("--grid", help="only this grid's cells")
    plot.add_argument(
        "--out", default="results/plots", help="folder for the PNG and HTML files (default results/plots)"
    )
    plot.set_defaults(handler=cmd_plot)

    show = sub.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    show.set_defaults(handler=cmd_show)

    lst = sub.add_parser("list", help="list components (with options), checkpoint formats or presets")
    lst.add_argument("kind", nargs="?", help=f"one of {', '.join(LIST_KINDS)} (default: the four components)")
    lst.set_defaults(handler=cmd_list)

    compare = sub.add_parser(
        "compare", help="re-measure a paper's claims (FastVLM vs its baselines) here: Markdown table and TTFT plot"
    )
    compare.add_argument("claims", nargs="?", default="fastvlm", help="claims name or YAML path (default: fastvlm)")
    compare.add_argument("overrides", nargs="*", help="key=value for every system, SYSTEM:key=value for one")
    compare.add_argument(
        "--systems", help="comma-separated subset of the file's systems (default: all its claims need)"
    )
    compare.add_argument("--count-only", action="store_true", help="tokens, params and FLOPs only; nothing is timed")
    compare.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    compare.add_argument("--dtype", default="float32", help="dtype to try first (default float32; then bfloat16)")
    compare.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    compare.add_argument("--repeats", type=int, default=3, help="timed repeats per system (default 3)")
    compare.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    compare.add_argument(
        "--max-llm-layers", type=int, help="cut deeper LLMs to this many layers and scale their prefill (estimate)"
    )
    compare.add_argument("--memory-gb", type=float, help="memory budget for weights (default: what is available now)")
    compare.add_argument(
        "--out", default="ablate-compare", help="folder for compare.md/.png/.json (default ./ablate-compare)"
    )
    compare.add_argument("--json", action="store_true", help="print exactly one JSON object (the result) on stdout")
    compare.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    compare.set_defaults(handler=cmd_compare)

    data = sub.add_parser("data", help="generate data sets (synth: the synthetic text-reading task)")
    data_sub = data.add_subparsers(dest="data_command", parser_class=_Parser, required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic text-rich VQA task (LLaVA format)")
    synth.add_argument("--out", required=True, help="folder to write images, train/test JSON, tokenizer, meta.json")
    synth.add_argument("--seed", type=int, default=0, help="seed: the same seed and options give the same bytes")
    synth.add_argument("--train", type=int, default=2000, help="training records (default 2000)")
    synth.add_argument("--test", type=int, default=200, help="held-out records (default 200)")
    synth.add_argument("--image-size", type=int, default=256, help="canvas size in pixels (default 256)")
    synth.add_argument("--font-size", default="20-24", help="text height on the canvas, N or LOW-HIGH (default 20-24)")
    synth.add_argument("--kind", default="words", help="words or numbers (default words)")
    synth.add_argument("--answers", type=int, default=16, help="answer pool size; chance = 1/answers (default 16)")
    synth.add_argument("--clutter", type=int, default=6, help="distractor shapes per image (default 6)")
    synth.add_argument("--position", default="center", help="center (default), jitter (near it) or random")
    synth.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    synth.set_defaults(handler=cmd_data_synth)

    train = sub.add_parser("train", help="train a config's stages (train: section) on a LLaVA-format data folder")
    train.add_argument("config", help="preset name, YAML path, or a model directory to train further")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=8")
    train.add_argument("--data", required=True, help="data folder: train.json (or each stage's `data`), images")
    train.add_argument("--out", required=True, help="run folder; an interrupted run resumes when started again")
    train.add_argument("--device", help="cpu, cuda, cuda:N (run.device)")
    train.add_argument("--threads", type=int, help="torch CPU threads (run.threads)")
    train.add_argument("--wandb", action="store_const", const=True, help="log to W&B (train.wandb)")
    train.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    train.set_defaults(handler=cmd_train)

    evaluate = sub.add_parser("eval", help="accuracy (exact match, ANLS) and timing of a trained model: one record")
    evaluate.add_argument("run_dir", help="a training run folder (or one of its checkpoints)")
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides, e.g. encoder.image_size=512")
    evaluate.add_argument("--data", required=True, help="data folder holding the evaluation file")
    evaluate.add_argument("--split", default="test.json", help="evaluation file in the data folder (default test.json)")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N records only")
    evaluate.add_argument("--batch-size", type=int, default=16, help="questions answered at once (default 16)")
    evaluate.add_argument("--max-new-tokens", type=int, default=16, help="longest answer generated (default 16)")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    evaluate.add_argument(
        "--db", help="also store the record in this results store, beside grid cells (`ablate results`, `ablate plot`)"
    )
    evaluate.add_argument("--json", action="store_true", help="print exactly one JSON object (the record) on stdout")
    evaluate.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    for flag in ("warmup", "repeats", "threads", "seed"):
        evaluate.add_argument(f"--{flag}", type=int, help=f"timing: run.{flag}")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:N (run.device)")
    evaluate.add_argument("--dtype", help="float32, bfloat16 or float16 (run.dtype)")
    evaluate.set_defaults(handler=cmd_eval)

    plugins = sub.add_parser("plugins", help="list plugins, their versions, what they register and load errors")
    plugins.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of failed plugins")
    plugins.set_defaults(handler=cmd_plugins)
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    # Run options: each flag sets the `run.` config key of the same name and wins over the config.
    parser.add_argument("--warmup", type=int, help="untimed repeats first (run.warmup, default 2)")
    parser.add_argument("--repeats", type=int, help="timed repeats; medians are reported (run.repeats, default 5)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (run.device, default cpu)")
    parser.add_argument(
        "--dtype",
        help="float32, bfloat16 or float16 for every component (run.dtype); run.dtypes.KIND=... sets one component's",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (run.threads; default: torch's choice)")
    parser.add_argument(
        "--mode", help="eager, compile (torch.compile) or cudagraph (CUDA graphs, GPU) (run.mode, default eager)"
    )
    parser.add_argument(
        "--memory-format",
        dest="memory_format",
        help="contiguous or channels_last (the encoder's convolutions) (run.memory_format, default contiguous)",
    )
    parser.add_argument(
        "--count-only",
        action="store_const",
        const=True,
        help="tokens, params, FLOPs on the meta device; no weights (run.count_only)",
    )
    parser.add_argument("--image", help="a real image file instead of the synthetic one (run.image)")
    parser.add_argument("--seed", type=int, help="seed of random weights, image and prompt (run.seed, default 0)")
    parser.add_argument(
        "--fidelity",
        action="store_const",
        const=True,
        help="first-token top-1 agreement and KL against the model without its reducer (run.fidelity)",
    )


# ---------------------------------------------------------------------------------------------- run

RUN_FLAGS = (
    "warmup",
    "repeats",
    "device",
    "dtype",
    "threads",
    "mode",
    "memory_format",
    "profile",
    "count_only",
    "image",
    "seed",
    "fidelity",
)


def cmd_run(args) -> int:
    from ablate.measurement import measure

    run_options = {flag: getattr(args, flag) for flag in RUN_FLAGS if getattr(args, flag) is not None}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("loading", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        try:
            record = measure(args.config, args.overrides, progress=progress, **run_options)
        except AblateError as exc:
            failed = getattr(exc, "record", None)
            if failed and (args.wandb or (failed["config"] or {}).get("wandb")):
                _log_to_wandb(failed)
            raise
    if args.wandb or record["config"]["wandb"]:
        _log_to_wandb(record)
    if args.json:
        print(json.dumps(record))
    else:
        print_record(record)
    return 0


def _log_to_wandb(record: dict[str, Any]) -> None:
    from ablate.tracking import log_record

    run_id = log_record(record, name=record["name"])
    err.print(f"W&B run {run_id} ({'failed' if record['error'] else 'finished'})", highlight=False)


# ---------------------------------------------------------------------------------------------- grids


def cmd_grid(args) -> int:
    from ablate.runner import grid_command

    run_options = {flag: getattr(args, flag) for flag in RUN_FLAGS if getattr(args, flag, None) is not None}
    return grid_command(args, run_options, out, err)


def cmd_results(args) -> int:
    from ablate.display import results_command

    return results_command(args, out, err)


def cmd_plot(args) -> int:
    from ablate.plots import plot_command

    return plot_command(args, err)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def print_record(record: dict[str, Any]) -> None:
    run, used = record["run"], record["execution"]["used"]
    mode = used["mode"] or run["mode"]
    if used["mode"] and used["mode"] != run["mode"]:
        mode += f" (asked: {run['mode']})"
    layout = f" {used['memory_format']}" if used["memory_format"] == "channels_last" else ""
    title = (
        f"{record['name']}: {_num(record['visual_tokens'])} visual + {record['prompt_tokens']} prompt tokens, "
        f"{run['device']} {run['dtype']} {mode}{layout}, {run['threads']} threads"
    )
    table = Table(title=title, title_justify="left")
    for column in ("stage", "median ms", "spread ms (IQR)", "tokens out", "GFLOPs", "params", "floor ms", "x floor"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    latency, spread_ms = record["latency_ms"], record["latency_spread_ms"]
    flops, params, tokens = record["flops"], record["params"], record["tokens"]
    roof = record["roofline"]["stages"]
    for stage, param_key in (
        ("preprocess", None),
        ("encoder", "encoder"),
        ("reducer", "reducer"),
        ("connector", "connector"),
        ("prefill", "decoder"),
    ):
        gflops = flops.get(stage)
        table.add_row(
            stage,
            _ms(latency[stage]),
            _ms(spread_ms[stage]),
            _num(tokens.get(stage)),
            "-" if gflops is None else f"{gflops / 1e9:,.2f}",
            _num(params.get(param_key)) if param_key else "",
            *_floor(roof.get(stage)),
        )
    table.add_section()
    total = flops.get("total")
    table.add_row(
        "stage sum",
        _ms(latency["stage_sum"]),
        _ms(spread_ms["stage_sum"]),
        "",
        "-" if total is None else f"{total / 1e9:,.2f}",
        _num(params.get("total")),
        "",
        "",
    )
    table.add_row(
        "[bold]TTFT (one call)",
        f"[bold]{_ms(latency['ttft'])}",
        _ms(spread_ms["ttft"]),
        f"{_num(tokens.get('llm_input'))} in",
        "",
        "",
        *_floor(roof.get("ttft")),
    )
    out.print(table)
    if latency["ttft"]:
        gap = (latency["stage_sum"] - latency["ttft"]) / latency["ttft"] * 100
        out.print(
            f"stage sum vs TTFT: {gap:+.1f}%   peak memory: {record['peak_memory_mb']:,.0f} MB   "
            f"medians of {run['repeats']} repeats after {run['warmup']} warm-up"
        )
    fidelity = record.get("fidelity")
    if fidelity:
        out.print(
            f"fidelity vs the model without its reducer: top-1 agreement {fidelity['top1_agreement']:.3f}, "
            f"KL {fidelity['kl']:.4g} nats ({fidelity['rows']} rows)"
        )
    for note in record["notes"]:
        out.print(f"note: {note}", highlight=False)
    if record["profile"]:
        _print_profile(record["profile"])


def _floor(figures: dict[str, Any] | None) -> tuple[str, str]:
    """The roofline columns: floor ms and measured / floor (with a launch-bound mark)."""
    if not figures or figures["floor_ms"] is None:
        return "-", "-"
    times = "-" if figures["measured_over_floor"] is None else f"{figures['measured_over_floor']:,.1f}"
    if figures.get("launch_bound"):
        times += " launch-bound"
    return f"{figures['floor_ms']:,.3f}", times


def _print_profile(profile: dict[str, Any]) -> None:
    table = Table(title=f"top kernels per stage (trace: {profile['trace']})", title_justify="left")
    for column in ("stage", "kernel / operator", "self ms", "calls", "share"):
        table.add_column(column, justify="left" if column in ("stage", "kernel / operator") else "right")
    for stage, rows in profile["top"].items():
        for index, row in enumerate(rows):
            name = row["name"] if len(row["name"]) <= 70 else row["name"][:67] + "..."
            table.add_row(
                stage if index == 0 else "", name, _ms(row["self_ms"]), str(row["calls"]), f"{row['share']:.0%}"
            )
        table.add_section()
    out.print(table)


# ---------------------------------------------------------------------------------------------- compare


def cmd_compare(args) -> int:
    from pathlib import Path

    from ablate.compare import Options, compare, load_claims, write

    overrides = list(args.overrides)
    if "=" in args.claims:  # `ablate compare key=value`: an override, the default claims
        overrides, args.claims = [args.claims, *overrides], "fastvlm"
    for flag in ("repeats", "warmup", "max_llm_layers"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            raise ConfigError(
                f"--{flag.replace('_', '-')} must be at least {0 if flag == 'warmup' else 1}, not {value}."
            )
    if args.memory_gb is not None and not args.memory_gb > 0:
        raise ConfigError(f"--memory-gb must be a positive number of GiB, not {args.memory_gb}.")
    claims = load_claims(args.claims)
    options = Options(
        systems=[name.strip() for name in args.systems.split(",") if name.strip()] if args.systems else None,
        overrides=overrides,
        count_only=args.count_only,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        max_llm_layers=args.max_llm_layers,
        memory_gb=args.memory_gb,
    )
    if err.is_terminal:
        with err.status("comparing") as status:
            result = compare(claims, options, progress=lambda what: status.update(what))
    else:  # a log: one line per step (not per repeat), so a long run shows where it is
        last = ""

        def progress(what: str) -> None:
            nonlocal last
            step = what.rsplit(" ", 1)[0] if what[-1:].isdigit() else what
            if step != last:
                last = step
                err.print(step, highlight=False, markup=False)

        result = compare(claims, options, progress=progress)
    result["files"] = write(result, Path(args.out))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        from ablate.compare import markdown

        out.print(markdown(result), highlight=False, markup=False, soft_wrap=True)
        err.print(f"wrote {', '.join(result['files'].values())}")
    return 0


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


LIST_KINDS = ("encoder", "reducer", "connector", "decoder", "format", "preset")


def cmd_list(args) -> int:
    from ablate.components import describe
    from ablate.registry import KINDS, get_registry

    registry = get_registry()
    kind = (args.kind or "").removesuffix("s")
    if kind and kind not in LIST_KINDS:
        raise ConfigError(f"Unknown kind '{args.kind}' for `ablate list`. Kinds: {', '.join(LIST_KINDS)}.")
    if kind == "preset":
        _list_presets()
    elif kind == "format":
        table = Table(title="checkpoint formats (ablate run DIRECTORY)", title_justify="left")
        for column in ("name", "plugin", "description"):
            table.add_column(column)
        for name in registry.names("checkpoint_format"):
            table.add_row(
                name, registry.owner[("checkpoint_format", name)], describe(registry.get("checkpoint_format", name))
            )
        out.print(table)
    for component_kind in [kind] if kind in KINDS else ([] if kind else list(KINDS)):
        table = Table(title=f"{component_kind}s", title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("plugin")
        table.add_column("description")
        table.add_column("options")
        for name in registry.names(component_kind):
            cls = registry.components[component_kind][name]
            table.add_row(name, registry.owner[(component_kind, name)], describe(cls), _options(cls.Config))
        out.print(table)
    broken = [p for p in registry.plugins.values() if p.error]
    if broken:
        err.print(
            f"[yellow]{len(broken)} plugin(s) failed to load: {', '.join(p.name for p in broken)}. "
            f"Run `ablate plugins` for details.[/]"
        )
    return 0


def _list_presets() -> None:
    from ablate.config import preset_files

    table = Table(title="presets (ablate run NAME)", title_justify="left")
    for column in ("name", "file", "description"):
        table.add_column(column)
    for name, path in sorted(preset_files().items()):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(name, str(path), first.lstrip("# "))
    out.print(table)


# ---------------------------------------------------------------------------------------------- data, train, eval


def cmd_data_synth(args) -> int:
    from ablate.data.synth import SynthOptions, generate, parse_font_size

    options = SynthOptions(
        seed=args.seed,
        train=args.train,
        test=args.test,
        image_size=args.image_size,
        font_size=parse_font_size(args.font_size),
        kind=args.kind,
        answers=args.answers,
        clutter=args.clutter,
        position=args.position,
    )
    with err.status(f"generating {options.train} + {options.test} records in {args.out}"):
        meta = generate(args.out, options)
    err.print(
        f"wrote {args.out}: {options.train} train / {options.test} test records, {len(meta['answers'])} answers "
        f"(chance {meta['chance']:.1%}), tokenizer of {meta['tokenizer']['vocab_size']} tokens",
        highlight=False,
    )
    return 0


def cmd_train(args) -> int:
    from ablate.training import train

    overrides = list(args.overrides)
    overrides += [f"run.{flag}={getattr(args, flag)}" for flag in ("device", "threads") if getattr(args, flag)]
    overrides += ["train.wandb=true"] if args.wandb else []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[figures]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, step: int, steps: int, figures: dict[str, float]) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=steps, completed=step - 1, figures="")
            text = (
                f"loss {figures['loss']:.4f}  {figures['images_per_s']:.1f} img/s  {figures['tokens_per_s']:,.0f} tok/s"
            )
            bar.update(tasks[stage], completed=step, figures=text)

        summary = train(args.config, overrides, data=args.data, out=args.out, progress=progress)
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] is not None else ""
    skipped = f", {summary['skipped_records']} bad records skipped" if summary["skipped_records"] else ""
    loss = "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    out.print(
        f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s{resumed}{skipped}; final loss {loss}; "
        f"model in {summary['run_dir']} (`ablate eval {summary['run_dir']} --data DIR`)",
        highlight=False,
    )
    return 0


def cmd_eval(args) -> int:
    from ablate.evaluation import evaluate
    from ablate.store import Store

    run_options = {
        flag: getattr(args, flag)
        for flag in ("warmup", "repeats", "threads", "seed", "device", "dtype")
        if getattr(args, flag) is not None
    }
    store = Store(args.db) if args.db else None  # a bad store fails before minutes of evaluation
    try:
        with err.status(f"evaluating {args.run_dir} on {args.split}"):
            record = evaluate(
                args.run_dir,
                args.overrides,
                data=args.data,
                split=args.split,
                limit=args.limit,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                skip_bad=args.skip_bad,
                **run_options,
            )
    except AblateError as exc:
        failed = getattr(exc, "record", None)
        if store is not None and failed and failed.get("config"):
            _store_eval(store, failed, args.db)
        raise
    if store is not None:
        _store_eval(store, record, args.db)
    if args.json:
        print(json.dumps(record))
    else:
        print_record(record)
        accuracy = record["accuracy"]
        chance = "" if accuracy["chance"] is None else f" (chance {accuracy['chance']:.1%})"
        out.print(
            f"accuracy on {accuracy['n']} records of {accuracy['split']}: exact match {accuracy['exact_match']:.1%}, "
            f"ANLS {accuracy['anls']:.3f}{chance}",
            highlight=False,
        )
    return 0


def _store_eval(store, record: dict[str, Any], path: str) -> None:
    from ablate.evaluation import eval_key

    with store:
        store.put(eval_key(record), record, label=f"eval {record['name']}")
    err.print(f"stored in {path}", highlight=False, markup=False)


def cmd_plugins(args) -> int:
    from ablate.registry import get_registry

    registry = get_registry()
    table = Table(title="plugins (entry-point group 'ablate')", title_justify="left")
    for column in ("plugin", "module", "version", "registers", "status"):
        table.add_column(column)
    for info in sorted(registry.plugins.values(), key=lambda p: p.name):
        registers = ", ".join(f"{kind} {name}" for kind, name in info.components if kind != "preset_folder")
        if any(kind == "preset_folder" for kind, _ in info.components):
            registers = ", ".join(filter(None, [registers, "presets"]))
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
