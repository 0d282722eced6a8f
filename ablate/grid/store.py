"""The results store: SQLite, one row per grid cell, keyed by the hash of the cell's resolved config.

A row holds the cell's record (what `ablate.measure` returns, or the `.record` of the error it raised) as JSON, plus
the columns the record's definition marks for indexing (`ablate.measurement.record.columns`), copied out of it. Rows
are read back as JSON dicts in the current schema (`record.migrate` upgrades older ones); a store written before
a column existed gains it, filled from its rows' JSON, when it is opened.

Safety: every write is one transaction, so a process killed at any moment (even `kill -9`) leaves each cell either
fully written or absent, and a rerun finds exactly one row per cell. The database runs in WAL mode with a long busy
timeout, so several processes (grid workers, two grids at once) may write at the same time; the last write of a
cell wins. Keep the file on a local disk, or a shared file system with working locks (not every NFS has them).

Tables:
    cells(key, status, label, created, <the record's indexed columns>, record)
    grids(id, name, spec, created)              what each grid was made from
    members(grid, key, position, label, wandb)  which cells make up a grid, in order; wandb: the cell's W&B run
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ablate.api.errors import ConfigError, did_you_mean
from ablate.api.hooks import KINDS
from ablate.measurement.record import Record, columns, migrate, value_at

STORE_VERSION = 1
BUSY_TIMEOUT_S = 120.0  # a writer waits this long for another's transaction before giving up
COLUMNS = columns()  # column -> dotted path into the record

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- ok | failed
    label TEXT,
    created REAL NOT NULL,
    {"".join(f"{column}, " for column in COLUMNS)}
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_status ON cells(status);
CREATE TABLE IF NOT EXISTS grids (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    grid TEXT NOT NULL,
    key TEXT NOT NULL,
    position INTEGER NOT NULL,
    label TEXT,
    wandb TEXT,
    PRIMARY KEY (grid, key)
);
"""

_FILTER = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(!=|<=|>=|=|<|>)(.*)$", re.S)
_SQL_OPS = {"=": "=", "!=": "IS NOT", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass
class Row:
    key: str
    status: str
    label: str | None
    record: dict[str, Any]
    grid: str | None = None  # the grid it was read through, if any


def _finite(value: Any) -> Any:
    """NaN and infinities as None: SQLite's JSON functions accept only standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _json_path(dotted: str) -> str:
    """'latency_ms.ttft' -> SQLite's JSON path '$."latency_ms"."ttft"'."""
    return "$" + "".join(f'."{part}"' for part in dotted.split("."))


def record_path(path: str) -> str:
    """A path as filters, sorts and columns take it -> its dotted path in the record: a component kind first means
    the config's component (`encoder` -> `config.encoder.name`, `encoder.image_size` -> `config.encoder.image_size`);
    any other path is the record's own (`visual_tokens`, `latency_ms.ttft`)."""
    parts = path.split(".")
    if parts[0] in KINDS:
        parts = ["config", *parts] + (["name"] if len(parts) == 1 else [])
    return ".".join(parts)


def order_key(value: Any) -> tuple:
    """How values of one path sort: numbers by size, then text, then anything else by its JSON (None: callers put it
    last)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, value) if isinstance(value, str) else (2, 0, json.dumps(value, sort_keys=True, default=str))


def _is_glob(value: Any) -> bool:
    return isinstance(value, str) and any(char in value for char in "*?[")


def _has(record: Any, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(record, dict) or part not in record:
            return False
        record = record[part]
    return True


def missing_path(path: str, records: Iterable[dict[str, Any]]) -> str:
    """Why no record has `path`: the first part of it no record has, and the keys the records have there (at the top,
    with the component shorthands)."""
    records, parts = list(records), path.split(".")
    missing = (d for d in range(len(parts)) if not any(_has(record, parts[: d + 1]) for record in records))
    depth = next(missing, len(parts) - 1)
    parent = ".".join(parts[:depth])
    keys = set()
    for record in records:
        below = value_at(record, parent) if parent else record
        keys.update(below if isinstance(below, dict) else ())
    if parent:
        where = f"Keys of {parent}"
    else:
        keys.update(KINDS)
        where = f"Paths at the top ({', '.join(KINDS)}: the config's components, e.g. encoder.image_size)"
    listed = f"{where}: {', '.join(sorted(keys))}." if keys else f"No row has a key under {parent}."
    return f"No row has '{path}'.{did_you_mean(parts[depth], keys)} {listed}"


class Store:
    """A results database. Open one per process (and per thread): connections do not cross processes."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ConfigError(
                f"No results store at {self.path}. Run a grid first (`ablate grid CONFIG key=a,b --db {self.path}`), "
                f"or give the right path with --db."
            )
        if self.path.is_dir():
            raise ConfigError(f"--db {self.path} is a folder; give a file path, e.g. {self.path / 'results.db'}.")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > STORE_VERSION:
                raise ConfigError(
                    f"Results store {self.path} was written by a newer ablate (store version {version}, this one reads "
                    f"{STORE_VERSION}). Upgrade ablate, or use another --db."
                )
            self.db.execute("PRAGMA journal_mode=WAL")
            with self._write():
                for statement in _SCHEMA.split(";"):
                    self.db.execute(statement)
                self._add_missing_columns()
                self.db.execute(f"PRAGMA user_version={STORE_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"{self.path} is not an ablate results store ({exc}). Give another --db path; a new one is created."
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"Cannot create the results store {self.path}: {exc}. Give a writable --db path."
            ) from None

    def _add_missing_columns(self) -> None:
        """Columns the record's definition gained since this store was written, filled from each row's JSON."""
        present = {row[1] for row in self.db.execute("PRAGMA table_info(cells)")}
        for column, path in COLUMNS.items():
            if column not in present:
                self.db.execute(f"ALTER TABLE cells ADD COLUMN {column}")
                self.db.execute(f"UPDATE cells SET {column} = json_extract(record, '{_json_path(path)}')")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction; IMMEDIATE takes the write lock up front, so concurrent writers queue, not fail."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------- writing

    def put(self, key: str, record: Record | dict[str, Any], label: str | None = None) -> None:
        """Store a cell's record (replacing an earlier one of the same key) in one transaction."""
        record = _finite(record.to_dict() if isinstance(record, Record) else record)
        names = ["key", "status", "label", "created", *COLUMNS, "record"]
        values = [key, "failed" if record.get("error") else "ok", label, time.time()]
        values += [value_at(record, path) for path in COLUMNS.values()]
        values.append(json.dumps(record, default=str))
        updates = ", ".join(f"{name}=excluded.{name}" for name in names[1:])
        with self._write():
            self.db.execute(
                f"INSERT INTO cells ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                f"ON CONFLICT(key) DO UPDATE SET {updates}",
                values,
            )

    def add_grid(self, grid_id: str, name: str, spec: dict[str, Any], cells: Iterable[tuple[str, str]]) -> None:
        """Record a grid and its cells, (key, label) in order; a grid seen before keeps what it had."""
        with self._write():
            self.db.execute(
                "INSERT OR IGNORE INTO grids (id, name, spec, created) VALUES (?, ?, ?, ?)",
                (grid_id, name, json.dumps(spec, default=str), time.time()),
            )
            self.db.executemany(
                "INSERT OR IGNORE INTO members (grid, key, position, label) VALUES (?, ?, ?, ?)",
                [(grid_id, key, position, label) for position, (key, label) in enumerate(cells)],
            )

    def set_wandb(self, grid_id: str, key: str, run_path: str) -> None:
        with self._write():
            self.db.execute("UPDATE members SET wandb=? WHERE grid=? AND key=?", (run_path, grid_id, key))

    # ------------------------------------------------------------------------------------------- reading

    def status(self, keys: Iterable[str]) -> dict[str, str]:
        """key -> 'ok' or 'failed', for the keys that have a row."""
        keys = list(keys)
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # SQLite limits the parameters of one statement
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.db.execute(f"SELECT key, status FROM cells WHERE key IN ({marks})", chunk).fetchall())
        return found

    def wandb_runs(self, grid_id: str) -> dict[str, str | None]:
        return dict(self.db.execute("SELECT key, wandb FROM members WHERE grid=?", (grid_id,)).fetchall())

    def grid_ids(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT id FROM grids ORDER BY created")]

    def rows(self, grid: str | None = None, filters: Iterable[str] = (), status: str | None = None) -> list[Row]:
        """Rows in grid order (or in the order they were written), filtered (see `parse_filter`)."""
        where, params = [], []
        if grid is not None:
            if grid not in self.grid_ids():
                names = self.grid_ids()
                raise ConfigError(
                    f"Grid '{grid}' is not in {self.path}.{did_you_mean(grid, names)} Grids there: "
                    f"{', '.join(names) or '(none)'}."
                )
            where.append("m.grid = ?")
            params.append(grid)
        if status is not None:
            where.append("c.status = ?")
            params.append(status)
        for text in filters:
            clause, values = self.parse_filter(text)
            where.append(clause)
            params.extend(values)
        if grid is not None:
            sql = "SELECT c.key, c.status, m.label, c.record FROM members m JOIN cells c ON c.key = m.key"
            order = "m.position"
        else:
            sql = "SELECT c.key, c.status, c.label, c.record FROM cells c"
            order = "c.created"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.execute(f"{sql} ORDER BY {order}", params).fetchall()
        return [Row(key, status, label, migrate(json.loads(record)), grid) for key, status, label, record in rows]

    def parse_filter(self, text: str) -> tuple[str, list[Any]]:
        """`PATH OP VALUE` as SQL over the record. PATH is a dotted path into the record (`visual_tokens`,
        `run.device`, `latency_ms.ttft`); a component kind first means the config's component (`encoder=NAME`,
        `encoder.image_size=512`). OP is one of = != < <= > >=; VALUE is read as YAML (`null` matches missing). A text
        VALUE with * ? or [...] is a pattern (SQLite's GLOB, case-sensitive): `encoder=clip*`, `decoder.arch!=*7b`."""
        path, op, value = self._split_filter(text)
        expression = f"json_extract(c.record, '{_json_path(path)}')"
        if value is None:
            return f"{expression} {'IS' if op == '=' else 'IS NOT'} NULL", []
        if op in ("=", "!=") and _is_glob(value):
            return (f"{expression} GLOB ?" if op == "=" else f"({expression} IS NULL OR {expression} NOT GLOB ?)"), [
                value
            ]
        if op in ("=", "!="):
            return f"{expression} {'IS' if op == '=' else 'IS NOT'} ?", [value]
        return f"{expression} {_SQL_OPS[op]} ?", [value]

    def _split_filter(self, text: str) -> tuple[str, str, Any]:
        """A filter's record path (checked: some row has it), operator and value."""
        match = _FILTER.match(text)
        if not match:
            raise ConfigError(
                f"Filter '{text}' is not PATH=VALUE (or !=, <, <=, >, >=). Examples: encoder.image_size=512, "
                f"visual_tokens<=256, run.device=cpu, error=null, encoder=clip*."
            )
        path, op, raw = match.groups()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:  # `*7b` reads as a YAML alias: a pattern, taken as written
            value = raw.strip()
        if isinstance(value, (dict, list)):
            raise ConfigError(f"Filter '{text}' compares with a list or mapping; compare one value at a time.")
        path = record_path(path)
        self.check_path(path)
        return path, op, value

    def check_path(self, path: str) -> None:
        """A record path no row has is a typo, not an empty result: say so, naming the keys there."""
        if self.db.execute("SELECT 1 FROM cells LIMIT 1").fetchone() is None:
            return
        if self.db.execute(
            f"SELECT 1 FROM cells c WHERE json_type(c.record, '{_json_path(path)}') IS NOT NULL LIMIT 1"
        ).fetchone():
            return
        sample = [json.loads(record) for (record,) in self.db.execute("SELECT record FROM cells LIMIT 200")]
        raise ConfigError(missing_path(path, sample))

    def explain_empty(self, filters: Iterable[str], grid: str | None = None, status: str | None = None) -> str:
        """Why `rows(grid, filters, status)` found nothing: each filter that alone matches no row, with the values
        the rows have there; or that each matches some rows but not all at once."""
        filters = list(filters)
        notes = []
        for text in filters:
            if self.rows(grid=grid, filters=[text], status=status):
                continue
            path, op, value = self._split_filter(text)
            present = self._values_at(path, grid)
            shown = ", ".join(str(item) for item in present[:20]) + (", ..." if len(present) > 20 else "")
            hint = ""
            if isinstance(value, str) and op == "=" and not _is_glob(value):
                if any(str(item).startswith(value) for item in present):
                    hint = f" For the names that start with it: '{text}*' (a pattern: * ? [...])."
                else:
                    hint = " A value with * ? [...] is a pattern, e.g. encoder=clip*."
            notes.append(f"'{text}' matches no row: {path} there is one of {shown or '(no value)'}.{hint}")
        if not notes and filters:
            notes.append(f"Each of {', '.join(repr(text) for text in filters)} matches some rows, but no row all.")
        return " ".join(notes)

    def _values_at(self, path: str, grid: str | None) -> list[Any]:
        """The distinct values the rows (of a grid) hold at a record path, sorted."""
        sql = f"SELECT DISTINCT json_extract(c.record, '{_json_path(path)}') AS v FROM cells c"
        params: list[Any] = []
        if grid is not None:
            sql += " JOIN members m ON c.key = m.key WHERE m.grid = ?"
            params.append(grid)
        values = [value for (value,) in self.db.execute(sql, params) if value is not None]
        return sorted(values, key=order_key)
