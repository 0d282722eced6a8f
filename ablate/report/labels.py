"""Short names for the cells of a set of records: only what tells them apart, only what applies to each.

    varying_keys(records)       the config keys (dotted) that tell the records apart, in config order
    cell_values(record, keys)   key -> value of those keys that apply to this record's components
    cell_label(record, keys)    'fastvithd 512px reducer=prumerge arch=qwen2-0.5b'
    cell_labels(records)        every record's label, from the keys that vary across them

A key varies when records hold different values for it. What a cell's components do not have (an option another
encoder has: absent, None or empty in this record) is left out of its label rather than written as `=None`. An option
whose value follows from its component's name (every CLIP cell has the same `encoder.model_name`) tells nothing the
name does not, so it is left out too. Sizes are what ran: where ablate chose a size (`image_size_fit: nearest`,
`target_tokens`), the record's `choices` hold it and the label shows it (a CLIP ViT-L/14 asked for 256 px ran at 252).

Short forms: the encoder's name bare (it leads a VLM's description); another component's name as `reducer=NAME`;
`encoder.image_size` as `512px`; any other option as `option=value` (`arch=qwen2-0.5b`), with its kind kept where
two varying keys would otherwise read alike (`encoder.weights=...`, `decoder.weights=...`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from ablate.api.hooks import KINDS
from ablate.measurement.record import flatten

LEAD_KIND = KINDS[0]  # the encoder: named bare, first
SIZE_KEY = f"{LEAD_KIND}.image_size"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _applies(value: Any) -> bool:
    return value is not None and value != {} and value != []


def applied_config(record: dict[str, Any]) -> dict[str, Any]:
    """The record's config flattened to dotted keys, with what ablate chose in place of what was asked, and without
    the keys that do not apply (None, empty)."""
    flat = flatten(record.get("config") or {})
    flat.update(record.get("choices") or {})
    return {key: value for key, value in flat.items() if _applies(value)}


def kind_of(key: str) -> str | None:
    """ "encoder.image_size" -> "encoder"; None for keys outside a component (run options, prompt_tokens)."""
    head, _, rest = key.partition(".")
    return head if head in KINDS and rest else None


def varying_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Config keys (dotted) whose applicable values differ between the records, in config order. An option that only
    some of the components have, with one value per component name, is left out: the name says it."""
    configs = [applied_config(record) for record in records]
    keys = list(dict.fromkeys(key for config in configs for key in config))
    varying = []
    for key in keys:
        values = [_text(config.get(key)) if key in config else None for config in configs]
        if len(set(values)) < 2:
            continue
        kind = kind_of(key)
        name_key = f"{kind}.name"
        if kind and key != name_key and None in values:  # an option only some of the components have
            by_name: dict[str, set] = {}
            for config, value in zip(configs, values):
                by_name.setdefault(_text(config.get(name_key)), set()).add(value)
            if len({_text(config.get(name_key)) for config in configs}) > 1 and all(
                len(seen) == 1 for seen in by_name.values()
            ):
                continue  # e.g. encoder.model_name: one per encoder name, so the name tells it
        varying.append(key)
    return varying


def cell_values(record: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """key -> value for the keys that apply to this record (what ran: `choices` over the config)."""
    config = applied_config(record)
    return {key: config[key] for key in keys if key in config}


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """key -> how the label writes it: the option alone where that is unambiguous among `keys`, else the full key."""
    leaf = {key: key.rpartition(".")[2] if kind_of(key) or "." in key else key for key in keys}
    counts: dict[str, int] = {}
    for name in leaf.values():
        counts[name] = counts.get(name, 0) + 1
    return {key: name if counts[name] == 1 else key for key, name in leaf.items()}


def cell_label(record: dict[str, Any], keys: Sequence[str], fallback: str | None = None) -> str:
    """This record's short label from `keys` (see the module's docstring); `fallback` (default: the record's name)
    when none of them applies."""
    values = cell_values(record, keys)  # in the order of `keys`
    names = _short_names([key for key in keys if not key.endswith(".name") or not kind_of(key)])

    # component by component in kind order, each its name first, then the rest (run options, prompt) as given
    def place(key: str) -> tuple[int, int]:
        kind = kind_of(key)
        return (KINDS.index(kind), 0 if key == f"{kind}.name" else 1) if kind else (len(KINDS), 0)

    ordered = sorted(values, key=place)  # a stable sort: options keep their order
    parts = []
    for key in ordered:
        value = values[key]
        if key == f"{LEAD_KIND}.name":
            parts.append(_text(value))
        elif kind_of(key) and key.endswith(".name"):
            parts.append(f"{kind_of(key)}={_text(value)}")
        elif key == SIZE_KEY and isinstance(value, int):
            parts.append(f"{value}px")
        else:
            parts.append(f"{names[key]}={_text(value)}")
    if parts or fallback is not None:
        return " ".join(parts) or fallback
    return str(record.get("name") or "(one config)")


def cell_labels(records: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> list[str]:
    """Every record's label, from the keys that vary across `records` (or the `keys` given)."""
    keys = varying_keys(records) if keys is None else list(keys)
    return [cell_label(record, keys) for record in records]
