"""A results store's rows to work with: `ablate.results(...)` in Python (dicts, or a pandas DataFrame), and the
choices `ablate results` offers on them: columns, sort order, a pivot.

Every path here is what filters take (`ablate.grid.store.record_path`): a dotted path into the record
(`latency_ms.ttft`, `visual_tokens`, `accuracy.exact_match`), or a component kind first for the config's components
(`encoder` is `config.encoder.name`, `encoder.image_size` is `config.encoder.image_size`); besides them `key`,
`label` (the cell's short label) and `status` (ok or failed) name a row.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ablate.api.errors import ConfigError
from ablate.grid.store import Row, Store, order_key, record_path
from ablate.measurement.record import flatten, value_at

DEFAULT_DB = "results/ablate.db"  # the CLI's --db default too (ablate.cli.flags); the report wing cannot import it
ROW_NAMES = ("key", "label", "status")  # not record paths: what names a row
ACCURACY_COLUMNS = ("accuracy.exact_match", "accuracy.anls", "accuracy.n")
# What the table shows unless --columns says otherwise (accuracy columns join when some row has them).
DEFAULT_COLUMNS = (
    "label",
    "status",
    "visual_tokens",
    "latency_ms.ttft",
    "latency_ms.encoder",
    "latency_ms.prefill",
    "flops.total",
    "params.total",
    "peak_memory_mb",
)

# Named column sets `--columns` takes in place of paths: the table one kind of study reports, with the columns that
# no row has a value in left out (e.g. fidelity under --count-only).
VIEWS = {
    # a token-reduction paper's table: method, budget (reducer.tokens, or encoder.target_tokens for downsampling),
    # the tokens the LLM's layers see on average and in the KV cache, the reducer's and the first token's latency,
    # fidelity against no reduction, and accuracy where the rows have it
    "reducers": (
        "reducer",
        "reducer.tokens",
        "encoder",
        "encoder.target_tokens",
        "llm_tokens.visual_layer_average",
        "llm_tokens.kv_positions",
        "latency_ms.reducer",
        "latency_ms.ttft",
        "fidelity.top1_agreement",
        "fidelity.kl",
        *ACCURACY_COLUMNS,
    ),
}


def results(
    db: str = DEFAULT_DB,
    where: str | Iterable[str] = (),
    *,
    grid: str | None = None,
    status: str | None = None,
    sort: str | Iterable[str] = (),
    descending: bool = False,
    columns: str | Iterable[str] | None = None,
    as_frame: bool = False,
) -> list[dict[str, Any]] | Any:
    """The rows of a results store, one flat dict per cell, as `ablate results` finds them:

        rows = ablate.results("results/r.db", where=["encoder=clip*", "visual_tokens<=256"], sort="latency_ms.ttft")
        frame = ablate.results("results/r.db", grid="mission-1a2b3c4d", as_frame=True)       # needs pandas
        frame.pivot_table(index="config.encoder.name", columns="config.encoder.image_size", values="latency_ms.ttft")

    Each dict holds `key`, `label` (the cell's short label), `status` and every field of the record flattened with
    dots (`latency_ms.ttft`, `config.encoder.image_size`); `columns` keeps only those paths (a block such as
    `latency_ms` gives each of its fields). `where` takes filters as the command line does (`PATH=VALUE`, != < <= > >=,
    patterns with * ? [...]); `grid` a grid id (`ablate results --grids`); `status` 'ok' or 'failed'; `sort` paths
    to order by (missing values last), `descending` to reverse. `as_frame=True` returns a pandas DataFrame (pandas is
    optional: `pip install pandas`). Bad paths or filters raise `ablate.api.errors.ConfigError`, naming what there
    is; filters that match no row warn, naming the values there are.
    """
    if as_frame:
        try:
            import pandas
        except ImportError:
            raise ConfigError(
                "ablate.results(..., as_frame=True) needs pandas: `pip install pandas`, or leave as_frame out for a "
                "list of dicts."
            ) from None
    where, sort = [where] if isinstance(where, str) else list(where), names(sort)
    with Store(db, create=False) as store:
        rows = store.rows(grid=grid, filters=where, status=status)
        if not rows and where:
            warnings.warn(f"No row matches: {store.explain_empty(where, grid, status)}", stacklevel=2)
        check_paths(store, sort, "sort")
        if columns is not None:
            columns = expand_columns(rows, names(columns))
            check_paths(store, columns, "column")
    lines = flat_rows(sort_rows(rows, sort, descending), columns)
    return pandas.DataFrame(lines) if as_frame else lines


def default_columns(rows: Sequence[Row]) -> list[str]:
    """What the table shows without --columns: the headline figures, and the accuracy some rows have."""
    return [*DEFAULT_COLUMNS, *accuracy_columns(rows)]


def accuracy_columns(rows: Sequence[Row]) -> list[str]:
    return [path for path in ACCURACY_COLUMNS if any(value_at(row.record, path) is not None for row in rows)]


def names(value: str | Iterable[str] | None) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b']."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def check_paths(store: Store, paths: Iterable[str], what: str) -> None:
    """Each path names a row (`key`, `label`, `status`) or is in some row of the store; else a ConfigError that says
    which keys there are."""
    for path in paths:
        if path not in ROW_NAMES:
            try:
                store.check_path(record_path(path))
            except ConfigError as exc:
                raise ConfigError(f"Unknown {what} '{path}': {exc} Besides: {', '.join(ROW_NAMES)}.") from None


def expand_columns(rows: Sequence[Row], columns: Iterable[str]) -> list[str]:
    """A column naming a block of the record (`latency_ms`, `accuracy`) becomes one column per field it holds; a
    view's name (`VIEWS`) its columns that some row has."""
    expanded = []
    for column in columns:
        if column in VIEWS:
            expanded += [path for path in VIEWS[column] if any(value_of(row, path) is not None for row in rows)]
            continue
        fields: dict[str, None] = {}
        if column not in ROW_NAMES:
            for row in rows:
                block = value_at(row.record, record_path(column))
                if isinstance(block, dict):
                    fields.update(dict.fromkeys(f"{column}.{name}" for name in block))
        expanded += list(fields) or [column]
    return expanded


def value_of(row: Row, path: str, labels: dict[str, str] | None = None) -> Any:
    """A row's value at a path (see the module's docstring); `labels`: key -> short label."""
    if path == "key":
        return row.key
    if path == "status":
        return row.status
    if path == "label":
        return (labels or {}).get(row.key) or row.label
    return value_at(row.record, record_path(path))


def short_labels(rows: Sequence[Row]) -> dict[str, str]:
    """key -> the row's label from only the config keys that vary across `rows` (a row without a config keeps the
    label it was stored with)."""
    from ablate.report.labels import cell_labels

    with_config = [row for row in rows if row.record.get("config")]
    labels = {row.key: row.label or str(row.record.get("name") or "-") for row in rows}
    labels.update(zip((row.key for row in with_config), cell_labels([row.record for row in with_config])))
    return labels


def check_values(rows: Sequence[Row], paths: Iterable[str], what: str) -> None:
    """A path that sorts or lays out a pivot names one value, not a block of them (`latency_ms`)."""
    for path in paths:
        for row in rows:
            block = value_of(row, path)
            if isinstance(block, dict):
                fields = ", ".join(f"{path}.{name}" for name in block)
                raise ConfigError(f"{what} '{path}' is a block of values; name one of them: {fields}.")


def sort_rows(rows: Sequence[Row], paths: Sequence[str], descending: bool = False) -> list[Row]:
    """Rows ordered by the values at `paths`, the first path first; rows missing a value go last either way."""
    rows = list(rows)
    check_values(rows, paths, "--sort path")
    labels = short_labels(rows) if "label" in paths else None
    for path in reversed(paths):  # stable sorts, least significant key first
        present = [row for row in rows if value_of(row, path, labels) is not None]
        present.sort(key=lambda row: order_key(value_of(row, path, labels)), reverse=descending)
        rows = present + [row for row in rows if value_of(row, path, labels) is None]
    return rows


def flat_rows(rows: Sequence[Row], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One dict per row: key, label, status and every record field flattened with dots; or only `columns`."""

    labels = short_labels(rows)
    if columns is None:
        return [{"key": row.key, "label": labels[row.key], "status": row.status, **flatten(row.record)} for row in rows]
    return [{column: value_of(row, column, labels) for column in columns} for row in rows]


# ---------------------------------------------------------------------------------------------- pivots


@dataclass
class Pivot:
    """Rows of the table: the distinct values of `index` (one or more paths); columns: the values of `column`;
    each cell: the store row there (one row, or several that agree on `value`)."""

    index: list[str]
    column: str
    value: str
    row_keys: list[tuple]
    column_keys: list[Any]
    cells: dict[tuple, Row]


def parse_pivot(text: str) -> tuple[list[str], str, str]:
    """'ROWS,COLUMNS,VALUE' (ROWS may join paths with +) -> (index paths, column path, value path)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 3 or not all(parts) or not all(parts[0].split("+")):
        raise ConfigError(
            f"--pivot '{text}' is not ROWS,COLUMNS,VALUE: three paths, e.g. --pivot "
            f"encoder,encoder.image_size,latency_ms.ttft (one row per encoder, one column per size, TTFT in the "
            f"cells); ROWS may join paths with +, e.g. encoder+reducer."
        )
    return [path.strip() for path in parts[0].split("+")], parts[1], parts[2]


def pivot(rows: Sequence[Row], index: Sequence[str], column: str, value: str) -> Pivot:
    """Lay the rows out as a table; a table cell that several rows with different values land in is a ConfigError
    naming what tells them apart."""
    from ablate.report.labels import varying_keys

    check_values(rows, [*index, column, value], "--pivot path")
    labels = short_labels(rows)
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        where = (tuple(value_of(row, path, labels) for path in index), value_of(row, column, labels))
        groups.setdefault(where, []).append(row)
    cells = {}
    for (row_key, column_key), members in groups.items():
        if len({repr(value_of(row, value, labels)) for row in members}) > 1:
            differ = varying_keys([row.record for row in members]) or ["key"]
            at = ", ".join(f"{path}={item}" for path, item in zip([*index, column], [*row_key, column_key]))
            one = " ".join(f"{path}={value_of(members[0], path)}" for path in differ)
            raise ConfigError(
                f"--pivot: {len(members)} rows with different {value} land at {at}; they differ in "
                f"{', '.join(differ)}. Filter them to one (e.g. {one}) or add them to the rows "
                f"(--pivot {'+'.join([*index, *differ])},{column},{value})."
            )
        cells[(row_key, column_key)] = members[0]
    row_keys = list(dict.fromkeys(row_key for row_key, _ in groups))
    column_keys = list(dict.fromkeys(column_key for _, column_key in groups))
    if all(isinstance(key, (int, float)) for key in column_keys):  # sizes, token counts: by size
        column_keys.sort()
    return Pivot(list(index), column, value, row_keys, column_keys, cells)


def pivot_json(layout: Pivot) -> dict[str, Any]:
    """A pivot as one JSON object: its paths, and one dict per line (its row paths' values, then a value per column
    value; null where the cell failed or has no value)."""
    lines = []
    for row_key in layout.row_keys:
        line = dict(zip(layout.index, row_key))
        for column_key in layout.column_keys:
            row = layout.cells.get((row_key, column_key))
            line[str(column_key)] = None if row is None else value_of(row, layout.value)
        lines.append(line)
    return {"index": layout.index, "columns": layout.column, "value": layout.value, "rows": lines}


def pivot_notes(layout: Pivot) -> list[str]:
    """What a reader of a pivot must know: that a token count is an upper bound; where a config path is what was
    asked but ablate ran another value (a nearest size, a size for N tokens: the record's `choices`)."""
    notes = []
    if record_path(layout.value) == "visual_tokens" and any(
        row.record.get("count_basis") == "upper bound" for row in layout.cells.values()
    ):
        notes.append("<=N: the cell's reducer decides its tokens by the image; N is the most it can keep.")
    for path in [*layout.index, layout.column]:
        resolved = record_path(path)
        if not resolved.startswith("config."):
            continue
        ran: dict[str, dict[str, None]] = {}  # table line -> 'asked->ran' of its cells
        for (row_key, _), row in layout.cells.items():
            asked, chosen = value_at(row.record, resolved), (row.record.get("choices") or {}).get(resolved[7:])
            if chosen is not None and chosen != asked:
                ran.setdefault(" ".join(str(item) for item in row_key), {})[f"{asked}->{chosen}"] = None
        lines: dict[tuple, list[str]] = {}  # the same changes on several lines: said once
        for line, changes in ran.items():
            lines.setdefault(tuple(changes), []).append(line)
        if lines:
            said = "; ".join(f"{', '.join(changes)} on {', '.join(where)}" for changes, where in lines.items())
            notes.append(f"{path} is what was asked; cells ran another value (the record's `choices`): {said}.")
    return notes
