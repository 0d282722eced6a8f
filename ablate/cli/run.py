"""`ablate run` (time one config), and the commands that inspect without running: `show`, `list`, `plugins`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.table import Table

from ablate.api.errors import AblateError, ConfigError
from ablate.api.hooks import KINDS
from ablate.cli.flags import MEASURE_FLAGS, parent, run_options
from ablate.cli.output import err, out, progress_bar

# `ablate list KIND`: the component kinds, checkpoint formats, and the named files of the preset folders.
LIST_KINDS = (*KINDS, "format", "preset", "grid", "claims", "stage")


def add_commands(sub) -> None:
    run = sub.add_parser(
        "run",
        parents=[parent("json", "debug", *MEASURE_FLAGS, "profile", "wandb")],
        help="build a config and time every stage and TTFT",
    )
    run.add_argument("config", help="preset name (`ablate list presets`), YAML path or checkpoint directory")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. encoder.image_size=512 encoder=timm")
    run.set_defaults(handler=cmd_run)

    export = sub.add_parser(
        "export",
        parents=[parent("json", "debug", *MEASURE_FLAGS)],
        help="write the stages a runtime prepared (e.g. ONNX files) and a manifest, to time them on another machine",
    )
    export.add_argument("config", help="preset name (`ablate list presets`), YAML path or checkpoint directory")
    export.add_argument("overrides", nargs="*", help="key=value overrides, e.g. encoder.image_size=512")
    export.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder (run.export)")
    export.set_defaults(handler=cmd_export)

    show = sub.add_parser("show", parents=[parent("debug")], help="print the resolved config")
    show.add_argument("config", help="preset name, YAML path or checkpoint directory")
    show.add_argument("overrides", nargs="*", help="key=value overrides")
    show.set_defaults(handler=cmd_show)

    listing = sub.add_parser(
        "list", parents=[parent("debug")], help="list components (with options), checkpoint formats, presets, grids"
    )
    listing.add_argument("kind", nargs="?", help=f"one of {', '.join(LIST_KINDS)} (default: the four components)")
    listing.set_defaults(handler=cmd_list)

    plugins = sub.add_parser(
        "plugins", parents=[parent("debug")], help="list plugins, their versions, what they register and load errors"
    )
    plugins.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of failed plugins")
    plugins.set_defaults(handler=cmd_plugins)


# ---------------------------------------------------------------------------------------------- run


def cmd_run(args) -> int:
    from ablate.measurement.measure import measure
    from ablate.report.tables import print_record

    with progress_bar() as bar:
        task = bar.add_task("loading", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        try:
            record = measure(args.config, args.overrides, progress=progress, **run_options(args)).to_dict()
        except AblateError as exc:
            failed = getattr(exc, "record", None)
            if failed is not None and (args.wandb or (failed.config or {}).get("wandb")):
                _log_to_wandb(failed.to_dict())
            raise
    if args.wandb or record["config"]["wandb"]:
        _log_to_wandb(record)
    if args.json:
        print(json.dumps(record))
    else:
        print_record(record, out)
    return 0


def cmd_export(args) -> int:
    """A run with run.export set: one repeat unless asked for more (the figures check the export, no more)."""
    from ablate.measurement.measure import measure

    options = {"repeats": 1, "warmup": 0, **run_options(args), "export": args.out}
    with progress_bar() as bar:
        task = bar.add_task("loading", total=None)
        record = measure(
            args.config,
            args.overrides,
            progress=lambda what, done, total: bar.update(task, description=what, completed=done, total=total),
            **options,
        ).to_dict()
    if args.json:
        print(json.dumps(record))
        return 0
    execution = record["execution"]
    for stage, ran in execution["runtimes"].items():
        deviation = (execution["deviation_from_eager"] or {}).get(stage)
        out.print(f"{stage}: {ran}" + ("" if deviation is None else f" ({deviation:.1e} from eager)"), highlight=False)
    for sentence in execution["fallbacks"]:
        out.print(f"fallback: {sentence}", highlight=False)
    out.print(record["notes"][-1], highlight=False)
    return 0


def _log_to_wandb(record: dict[str, Any]) -> None:
    from ablate.report.tracking import log_record

    run_id = log_record(record, name=record["name"])
    err.print(f"W&B run {run_id} ({'failed' if record['error'] else 'finished'})", highlight=False)


# ---------------------------------------------------------------------------------------------- show, list


def cmd_show(args) -> int:
    from ablate.config.compose import load_config

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
    from ablate.api.components import describe
    from ablate.api.registry import get_registry

    registry = get_registry()
    kind = (args.kind or "").removesuffix("s")
    kind = "claims" if kind == "claim" else kind
    if kind and kind not in LIST_KINDS:
        raise ConfigError(f"Unknown kind '{args.kind}' for `ablate list`. Kinds: {', '.join(LIST_KINDS)}.")
    if kind in ("preset", "grid", "claims", "stage"):
        _list_files(kind)
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
        named = []
        for name in registry.names(component_kind):
            cls = registry.components[component_kind][name]
            table.add_row(name, registry.owner[(component_kind, name)], describe(cls), _options(cls.Config))
            named += [(name, option, values) for option, values in cls.named_values().items()]
        out.print(table)
        for name, option, values in named:
            values_table = Table(title=f"{component_kind}.{option} of {name}", title_justify="left")
            values_table.add_column(option, style="bold")
            values_table.add_column("what it is")
            for value, description in values.items():
                values_table.add_row(value, description)
            out.print(values_table)
    broken = [p for p in registry.plugins.values() if p.error]
    if broken:
        err.print(
            f"[yellow]{len(broken)} plugin(s) failed to load: {', '.join(p.name for p in broken)}. "
            f"Run `ablate plugins` for details.[/]"
        )
    return 0


# kind of named file -> how it is used, for the table's title
_USES = {
    "preset": "ablate run NAME",
    "grid": "ablate grid NAME",
    "claims": "ablate compare NAME",
    "stage": "train.stages: [NAME, ...]",
}


def _list_files(kind: str) -> None:
    from ablate.config.presets import named_files

    table = Table(title=f"{kind if kind == 'claims' else kind + 's'} ({_USES[kind]})", title_justify="left")
    for column in ("name", "file", "description"):
        table.add_column(column)
    for name, path in named_files(kind).items():
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(name, str(path), first.lstrip("# "))
    out.print(table)


def cmd_plugins(args) -> int:
    from ablate.api.registry import get_registry

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
