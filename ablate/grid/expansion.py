"""Grids: a base config and the keys to sweep, expanded into cells, one resolved config each.

A grid file is YAML:

    name: resolution-sweep          # the grid's name (default: the file's stem)
    base: fastvlm-0.5b              # a preset name or a config path (relative to the grid file)
    set: {prompt_tokens: 64}        # overrides for every cell
    sweep:                          # the cartesian product of these keys' values
      encoder.image_size: [256, 512, 768, 1024]
    zip:                            # keys that vary together: each group's lists have one length
      - {encoder.image_size: [512, 1024], prompt_tokens: [32, 64]}
    cells:                          # explicit cells, each a set of overrides, crossed with the swept keys
      - {encoder.name: my-encoder, encoder.depth: 12}
    exclude:                        # drop every cell that matches all the keys of one entry
      - {encoder.image_size: 256, prompt_tokens: 64}
    run: {repeats: 3, warmup: 1}    # run options of every cell (`ablate grid` flags win)
    wandb: false                    # log every cell to W&B (or --wandb)

On the command line the same follows Hydra's multirun convention: `key=a,b,c` sweeps a key (commas outside
brackets, braces and quotes separate values) and `key=a` sets it in every cell. `ablate grid CONFIG key=a,b` takes
any config (preset, YAML or checkpoint directory) as the base; `ablate grid GRID.yaml key=a,b` adds (or replaces) a
swept key of a grid file, and `key=a` on a key the file sweeps narrows that sweep to `a` (a subset of the grid).

A cell is keyed by a hash of its resolved config, `run:` section included (W&B logging is not part of it): two cells
that resolve alike are one cell, and a results store knows a cell it has seen. A cell whose config does not resolve
(an impossible combination) keeps its error and a key hashed from its overrides; it fails when run, and the grid
goes on. A grid file that is itself wrong (unknown keys, empty sweeps, zipped lists of unequal length, excludes
naming keys nothing varies) is a ConfigError. Expanding a grid never looks at this machine: a grid of `cuda` cells
expands and dry-runs on a login node without a GPU, and each cell's run checks the machine it lands on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ablate.api.errors import AblateError, ConfigError, did_you_mean
from ablate.api.hooks import KINDS
from ablate.api.registry import Registry, get_registry
from ablate.config.compose import config_hash, load_config, parse_override, read_yaml
from ablate.config.presets import named_files, preset_files

GRID_KEYS = ("name", "description", "base", "set", "sweep", "zip", "cells", "exclude", "run", "wandb")
AXIS_KEYS = ("set", "sweep", "zip", "cells", "exclude")  # a YAML file with one of these is a grid file


@dataclass(frozen=True)
class Cell:
    """One configuration of a grid: the base config plus `overrides`, run with the grid's run options."""

    values: dict[str, Any]  # the values this cell varies, key -> value (its label, W&B config)
    overrides: tuple[str, ...]  # every override applied to the base, in order, as `key=value` text
    key: str  # sha256 of the resolved config (or of base + overrides + run options, when it does not resolve)
    error: str | None = None  # why the config does not resolve; the cell fails when run
    wandb: bool = False  # the resolved config asks for W&B logging
    device: str = "cpu"  # run.device of the resolved config: the launcher places `cuda` cells on its GPUs

    @property
    def label(self) -> str:
        return " ".join(f"{key}={show_value(value)}" for key, value in self.values.items()) or "(base config)"


@dataclass
class Grid:
    name: str
    base: str  # preset name or config path
    run: dict[str, Any]  # run options of every cell
    cells: list[Cell]
    spec: dict[str, Any] = field(default_factory=dict)  # what the grid was made from, for the record
    merged: int = 0  # cells that resolved to the same config as an earlier cell
    excluded: int = 0
    wandb: bool = False

    @property
    def id(self) -> str:
        """The grid's name and a hash of its cells: the same grid gets the same id when it resumes."""
        digest = hashlib.sha256("\n".join(sorted(cell.key for cell in self.cells)).encode()).hexdigest()
        return f"{self.name}-{digest[:8]}"


def show_value(value: Any) -> str:
    """A value as one writes it on the command line: strings bare, everything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def override_text(key: str, value: Any) -> str:
    """`key=value` that `ablate.config` parses back to exactly `value` (JSON is valid YAML)."""
    return f"{key}={json.dumps(value)}"


# ------------------------------------------------------------------------------------------ command line


def split_values(text: str) -> list[str]:
    """'a,[1,2],"x,y"' -> ['a', '[1,2]', '"x,y"']: commas outside brackets, braces and quotes separate values."""
    values, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:index])
            start = index + 1
    values.append(text[start:])
    return values


def parse_cli(overrides: Iterable[str]) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Command-line `key=a,b` (swept) and `key=a` (set in every cell) as Python values."""
    swept: dict[str, list[Any]] = {}
    fixed: dict[str, Any] = {}
    for text in overrides:
        name, equals, raw = text.partition("=")
        # the key alone first: the whole value (`{a: 1},{a: 2}`) is no YAML until split
        key = ".".join(parse_override(f"{name}=" if equals else text)[0])
        values = [parse_override(f"{key}={part}")[1] for part in split_values(raw)]
        if any(part.strip() == "" for part in split_values(raw)) and len(values) > 1:
            raise ConfigError(f"Sweep '{text}' has an empty value between commas. Example: {key}=256,512.")
        if key in swept or key in fixed:
            raise ConfigError(f"Key '{key}' is given twice on the command line; give it once, e.g. {key}=a,b.")
        if len(values) > 1:
            swept[key] = values
        else:
            fixed[key] = values[0]
    return swept, fixed


# ------------------------------------------------------------------------------------------- grid files


def find_grid_source(source: str, registry: Registry | None = None) -> str:
    """A shipped grid's path for its bare name; anything else as it is (a path, a preset, a checkpoint)."""
    plain = "/" not in source and not source.endswith((".yaml", ".yml")) and not Path(source).exists()
    if not plain or source in preset_files(registry):
        return source
    grids = named_files("grid", registry)
    if source in grids:
        return str(grids[source])
    names = sorted(grids) + sorted(preset_files(registry))
    raise ConfigError(
        f"'{source}' is neither a grid, a preset nor a file.{did_you_mean(source, names)} Grids: "
        f"{', '.join(sorted(grids)) or '(none)'}; presets: {', '.join(sorted(preset_files(registry)))} (`ablate list "
        f"presets`). Give a grid file, a config or a preset name."
    )


def is_grid_file(source: str) -> bool:
    path = Path(source)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False  # not for us to judge: the config reader says what is wrong with it
    return isinstance(data, dict) and any(key in data for key in AXIS_KEYS)


def _mapping(value: Any, where: str, example: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where} must be a non-empty mapping of config keys, not {value!r}. Example: {example}.")
    for key in value:
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{where} has a key {key!r} that is not a config key. Example: {example}.")
    return dict(value)


def _entries(value: Any, where: str, example: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of mappings, not {value!r}. Example: {example}.")
    return [_mapping(item, f"{where}[{index}]", example) for index, item in enumerate(value)]


def _sweep_list(key: str, values: Any, where: str) -> list[Any]:
    if not isinstance(values, list):
        raise ConfigError(
            f"{where} '{key}' must be a list of values, not {values!r}. Example: {key}: [a, b]; for one value in every "
            f"cell use `set:`."
        )
    if not values:
        raise ConfigError(f"{where} '{key}' is an empty list: the grid would have no cells. Give at least one value.")
    return values


class _Axes:
    """The grid's axes: each a list of options, each option a {key: value} mapping; cells are their product."""

    def __init__(self):
        self.axes: list[list[dict[str, Any]]] = []
        self.owner: dict[str, str] = {}  # varied key -> where it is varied

    def add(self, options: list[dict[str, Any]], where: str) -> None:
        for key in {key for option in options for key in option}:
            if key in self.owner:
                raise ConfigError(
                    f"Key '{key}' is varied twice, in {self.owner[key]} and in {where}: vary each key in one place."
                )
            self.owner[key] = where
        self.axes.append(options)

    def product(self) -> list[dict[str, Any]]:
        cells = []
        for combination in itertools.product(*self.axes):
            merged: dict[str, Any] = {}
            for option in combination:
                merged.update(option)
            cells.append(merged)
        return cells


def _stem(source: str) -> str:
    """'experiments/fastvlm-0.5b.yaml' or 'fastvlm-0.5b' -> 'fastvlm-0.5b' (Path.stem would cut at '.5b')."""
    name = Path(source.rstrip("/")).name
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name or "grid"


def _read_grid_file(path: Path) -> dict[str, Any]:
    data = read_yaml(path)
    for key in data:
        if key not in GRID_KEYS:
            raise ConfigError(
                f"Unknown key '{key}' in grid file {path}.{did_you_mean(str(key), GRID_KEYS)} Grid keys: "
                f"{', '.join(GRID_KEYS)}. Config keys go under `set:` (one value) or `sweep:` (a list)."
            )
    if not isinstance(data.get("base"), str) or not data["base"].strip():
        raise ConfigError(f"Grid file {path} needs `base:`, a preset name or a config path, e.g. base: tiny.")
    base = data["base"]
    local = path.parent / base
    if local.exists():  # a path relative to the grid file; otherwise a preset name or a path from here
        base = str(local)
    return {**data, "base": base}


# --------------------------------------------------------------------------------------------- expansion


def load_grid(
    source: str,
    overrides: Iterable[str] = (),
    run_options: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    wandb: bool = False,
    registry: Registry | None = None,
) -> Grid:
    """The grid described by `source` (a grid file, or any config as the base) and command-line `overrides`.

    `run_options` (the `ablate grid` flags) win over the grid file's `run:`.
    """
    registry = registry or get_registry()
    swept_cli, fixed_cli = parse_cli(overrides)
    source = find_grid_source(str(source), registry)
    if is_grid_file(source):
        path = Path(source)
        data = _read_grid_file(path)
        name = name or data.get("name") or _stem(source)
    else:
        data = {"base": source}
        name = name or _stem(source)
    axes = _Axes()
    sweep = (
        dict(_mapping(data["sweep"], "`sweep:`", "sweep: {encoder.image_size: [256, 512]}")) if "sweep" in data else {}
    )
    for key in [key for key in fixed_cli if key in sweep]:  # `key=a` on a swept key narrows the sweep to a
        swept_cli[key] = [fixed_cli.pop(key)]
    sweep.update(swept_cli)  # a key swept on the command line replaces the file's values for it
    for key, values in sweep.items():
        where = "the command line" if key in swept_cli else "`sweep:`"
        axes.add([{key: value} for value in _sweep_list(key, values, f"Swept key in {where}")], where)
    for index, group in enumerate(
        _entries(data["zip"], "`zip:`", "zip: [{a: [1, 2], b: [3, 4]}]") if "zip" in data else []
    ):
        lists = {key: _sweep_list(key, values, f"Zipped key in zip[{index}]") for key, values in group.items()}
        lengths = {key: len(values) for key, values in lists.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"zip[{index}] zips lists of unequal length ({', '.join(f'{k}: {n}' for k, n in lengths.items())}): "
                f"zipped keys vary together, so give each the same number of values."
            )
        options = [dict(zip(lists, row)) for row in zip(*lists.values())]
        axes.add(options, f"zip[{index}]")
    if "cells" in data:
        axes.add(
            _entries(data["cells"], "`cells:`", "cells: [{encoder.image_size: 512, prompt_tokens: 32}]"), "`cells:`"
        )
    fixed = dict(_mapping(data["set"], "`set:`", "set: {prompt_tokens: 32}")) if "set" in data else {}
    # `key=value` on a key that `zip:` or `cells:` varies keeps the cells with that value (a timed subset).
    narrow = {key: fixed_cli.pop(key) for key in list(fixed_cli) if key in axes.owner}
    fixed.update(fixed_cli)
    excludes = (
        _entries(data["exclude"], "`exclude:`", "exclude: [{encoder.image_size: 256}]") if "exclude" in data else []
    )
    for index, entry in enumerate(excludes):
        for key in entry:
            if key not in axes.owner:
                raise ConfigError(
                    f"exclude[{index}] names '{key}', which no cell varies.{did_you_mean(key, axes.owner)} An exclude "
                    f"matches swept keys only: {', '.join(axes.owner) or 'none are swept'}."
                )
    run = dict(_mapping(data["run"], "`run:`", "run: {repeats: 3}")) if "run" in data else {}
    run.update(run_options or {})
    grid_wandb = bool(wandb or data.get("wandb", False))

    everything = axes.product()
    kept = [values for values in everything if not any(_matches(values, entry) for entry in excludes)]
    if not kept:
        raise ConfigError(f"Every cell of grid '{name}' is excluded: loosen `exclude:`.")
    for key, value in narrow.items():
        found = sorted({show_value(values[key]) for values in kept if key in values})
        kept = [values for values in kept if key in values and values[key] == value]
        if not kept:
            raise ConfigError(
                f"No cell of grid '{name}' has {key}={show_value(value)} (set on the command line, it keeps the cells "
                f"with that value; {axes.owner[key]} varies it): its cells have {key} = {', '.join(found)}. Use one "
                f"of those, or sweep the key on the command line ({key}=a,b) where the grid file sweeps it."
            )
    cells: list[Cell] = []
    seen: set[str] = set()
    for values in kept:
        cell = make_cell(data["base"], fixed, values, run, registry, grid_wandb)
        if cell.key not in seen:
            seen.add(cell.key)
            cells.append(cell)
    if all(cell.error for cell in cells):  # nothing can run: the grid itself is wrong, not one combination
        first = cells[0]
        raise ConfigError(f"No cell of grid '{name}' has a valid config; the first ({first.label}): {first.error}")
    spec = {key: data[key] for key in GRID_KEYS if key in data}
    spec.update(base=data["base"], command_line=list(overrides), run=run)
    return Grid(
        name=str(name),
        base=data["base"],
        run=run,
        cells=cells,
        spec=spec,
        merged=len(kept) - len(cells),
        excluded=len(everything) - len(kept),
        wandb=grid_wandb or any(cell.wandb for cell in cells),
    )


def _matches(values: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    return all(key in values and values[key] == value for key, value in entry.items())


def _is_swap(key: str) -> bool:
    """`encoder=X` or `encoder.name=X` resets that component's options, so it goes before the options it gets."""
    return key in KINDS or (key.count(".") == 1 and key.split(".")[0] in KINDS and key.endswith(".name"))


def make_cell(
    base: str,
    fixed: Mapping[str, Any],
    values: Mapping[str, Any],
    run: Mapping[str, Any],
    registry: Registry,
    grid_wandb: bool = False,
) -> Cell:
    """Resolve one cell: `fixed` then `values` over `base`, component swaps first so their options survive."""
    ordered = list({**fixed, **values}.items())
    ordered = [item for item in ordered if _is_swap(item[0])] + [item for item in ordered if not _is_swap(item[0])]
    overrides = tuple(override_text(key, value) for key, value in ordered)
    try:
        config = load_config(base, overrides, registry, run=run)
    except AblateError as exc:
        unresolved = {"base": base, "overrides": overrides, "run": dict(run)}
        key = hashlib.sha256(json.dumps(unresolved, sort_keys=True, default=str).encode()).hexdigest()
        return Cell(dict(values), overrides, key, str(exc), grid_wandb, str(run.get("device", "cpu")))
    return Cell(
        dict(values), overrides, config_hash(config.to_dict()), None, grid_wandb or config.wandb, config.run.device
    )
