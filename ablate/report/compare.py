"""`ablate compare`: re-measure a paper's comparisons on this machine, one row per claim.

A claims file (YAML) names the systems (a config plus overrides each) and the claims: which system is claimed to
beat which, and the paper's ratios (baseline / fast: times faster, fewer tokens, smaller encoder). Every system is
counted on the meta device and timed (TTFT broken into stages), then each claim's ratios are computed from the
records: TTFT, encoder latency, visual tokens, encoder parameters.

Systems too big for the memory budget are never skipped silently. Each runs in the largest form that fits: the
requested dtype, else bfloat16, else its LLM cut to k of its L layers with the prefill time scaled by L/k (an
estimate, labelled so); a system that fits in no form is counted only. `--max-llm-layers` cuts bigger LLMs on
purpose, to bound the run time on a slow machine. The claims files shipped with ablate live in the preset folders'
`claims/` subfolder (`ablate compare fastvlm`); any YAML path works too.

    title: ...
    paper_hardware: TEXT                              # where the paper timed (named when latency gaps are flagged)
    layers_key: decoder.overrides.num_hidden_layers   # the override that sets the LLM's depth
    systems:
      NAME: {config: PRESET_OR_PATH, overrides: [key=value, ...], llm_layers: L}
    claims:
      - {claim: TEXT, source: TEXT, fast: NAME, baseline: NAME,
         paper: {ttft: X, encoder_ms: X, tokens: X, encoder_params: X, flops: X}}   # any of them; null = not claimed

Every ratio is baseline / FastVLM side, so above 1 the FastVLM side wins; the table reads it oriented ("3.2x faster",
or for 0.8 "1.25x slower") and flags a measured ratio more than 25% away from the paper's with the likely reason.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ablate.api.errors import AblateError, ConfigError, ResourceError, did_you_mean
from ablate.config.compose import load_config, read_yaml
from ablate.config.presets import named_files
from ablate.config.run_options import DTYPES, RunOptions
from ablate.measurement.machine import available_memory, check_run_options, cpu_features, device_name
from ablate.measurement.measure import measure
from ablate.model.vlm import STAGES
from ablate.version import DISTRIBUTION


@dataclass(frozen=True)
class Metric:
    title: str  # the column's title
    what: str  # what the ratio divides
    better: str  # the word for a ratio above 1 (the FastVLM side has less of it)
    worse: str  # the word for a ratio below 1, read inverted


METRICS = {
    "ttft": Metric("TTFT", "time to first token", "faster", "slower"),
    "encoder_ms": Metric("encoder latency", "encoder stage", "faster", "slower"),
    "tokens": Metric("visual tokens", "tokens the LLM reads for the image", "fewer", "more"),
    "encoder_params": Metric("encoder params", "vision encoder parameters", "smaller", "larger"),
    "flops": Metric("FLOPs", "FLOPs of the four stages up to the first token", "fewer", "more"),
}
GAP = 0.25  # a measured ratio more than 1.25x above or below the paper's is flagged, with its likely reason
Progress = Callable[[str], None]


@dataclass
class System:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    llm_layers: int | None = None  # the LLM's depth, for cutting it to fit


@dataclass
class Claim:
    claim: str
    fast: str
    baseline: str
    source: str = ""
    paper: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Claims:
    title: str
    systems: dict[str, System]
    claims: list[Claim]
    layers_key: str | None = None
    path: str = ""
    paper_hardware: str = ""  # where the paper timed its latencies


# ------------------------------------------------------------------------------------------- claims file


def load_claims(source: str) -> Claims:
    """A claims file by name (a preset folder's claims/NAME.yaml) or path, checked strictly."""
    files = named_files("claims")
    path = files.get(source) or Path(source)
    if not path.is_file():
        raise ConfigError(
            f"Claims file '{source}' is neither a file nor a known claims name.{did_you_mean(source, files)} "
            f"Known: {', '.join(sorted(files)) or 'no claims files found'}."
        )
    data = read_yaml(path)
    where = f"claims file {path}"
    _check_keys(data, {"title", "paper_hardware", "systems", "claims", "layers_key"}, where)
    systems = {}
    for name, node in (data.get("systems") or {}).items():
        if not isinstance(node, Mapping) or not isinstance(node.get("config"), str):
            raise ConfigError(f"System '{name}' in {where} needs a mapping with a `config` (preset or path).")
        _check_keys(node, {f.name for f in dataclasses.fields(System)} - {"name"}, f"system '{name}' in {where}")
        systems[str(name)] = System(
            name=str(name),
            config=node["config"],
            overrides=[str(o) for o in node.get("overrides") or []],
            llm_layers=node.get("llm_layers"),
        )
    claims = []
    for index, node in enumerate(data.get("claims") or []):
        if not isinstance(node, Mapping):
            raise ConfigError(f"Claim {index} in {where} must be a mapping (claim, fast, baseline, paper).")
        _check_keys(node, {f.name for f in dataclasses.fields(Claim)}, f"claim {index} in {where}")
        paper = dict(node.get("paper") or {})
        _check_keys(paper, set(METRICS), f"claim {index}'s paper ratios in {where}")
        for role in ("fast", "baseline"):
            if node.get(role) not in systems:
                raise ConfigError(
                    f"Claim {index} in {where}: {role} '{node.get(role)}' is not one of its systems "
                    f"({', '.join(systems)}).{did_you_mean(str(node.get(role)), systems)}"
                )
        claims.append(
            Claim(str(node.get("claim", "")), node["fast"], node["baseline"], str(node.get("source", "")), paper)
        )
    title = str(data.get("title") or path.stem)
    return Claims(title, systems, claims, data.get("layers_key"), str(path), str(data.get("paper_hardware") or ""))


def _check_keys(node: Mapping, allowed: set[str], where: str) -> None:
    for key in node:
        if key not in allowed:
            raise ConfigError(
                f"Unknown key '{key}' in {where}.{did_you_mean(str(key), allowed)} Keys: {', '.join(sorted(allowed))}."
            )


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Options:
    """How `compare` runs (the `ablate compare` flags)."""

    systems: list[str] | None = None  # a subset of the file's systems (claims needing others are shown unmeasured)
    overrides: list[str] = field(default_factory=list)  # key=value for every system, SYSTEM:key=value for one
    count_only: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    repeats: int = 3
    warmup: int = 1
    max_llm_layers: int | None = None  # cut deeper LLMs to this many layers (scaled estimate)
    memory_gb: float | None = None  # the budget for weights; default: the memory available now


def compare(claims: Claims, options: Options, progress: Progress | None = None) -> dict[str, Any]:
    """Measure the systems the claims need and compute every claim's ratios: the `ablate compare --json` object."""
    progress = progress or (lambda _: None)
    run_options = RunOptions(device=options.device, dtype=options.dtype, threads=options.threads)
    run_options.validate()
    check_run_options(run_options)  # the comparison runs here: a device or thread count it lacks fails at once
    names = _selected(claims, options)
    overrides = _split_overrides(options.overrides, claims)
    for name in names:  # bad configs and overrides fail here, before anything is measured
        system = claims.systems[name]
        load_config(system.config, system.overrides + overrides.get(None, []) + overrides.get(name, []))
    budget = options.memory_gb * 2**30 if options.memory_gb else None  # None: what is free when each system starts
    results: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        system = claims.systems[name]
        extra = system.overrides + overrides.get(None, []) + overrides.get(name, [])
        progress(f"[{index + 1}/{len(names)}] {name}: counting")
        try:
            step = f"[{index + 1}/{len(names)}] {name}"
            results[name] = _measure_system(system, extra, claims.layers_key, options, budget, progress, step)
        except AblateError as exc:  # a failing system is a row with its error, not a crashed comparison
            failed = getattr(exc, "record", None)
            results[name] = _summary(name, system, failed and failed.to_dict(), "failed", error=str(exc))
    device = _device_name(options.device)
    rows = [_claim_row(claim, results, device, claims.paper_hardware) for claim in claims.claims]
    return {
        "title": claims.title,
        "claims_file": claims.path,
        "paper_hardware": claims.paper_hardware or None,
        "device": device,
        "mode": "count-only" if options.count_only else "eager",
        "options": dataclasses.asdict(options),
        "systems": results,
        "claims": rows,
    }


def _selected(claims: Claims, options: Options) -> list[str]:
    if options.systems is None:
        needed = {name for claim in claims.claims for name in (claim.fast, claim.baseline)}
        return [name for name in claims.systems if name in needed] or list(claims.systems)
    for name in options.systems:
        if name not in claims.systems:
            raise ConfigError(
                f"Unknown system '{name}' (--systems).{did_you_mean(name, claims.systems)} Systems in {claims.path}: "
                f"{', '.join(claims.systems)}."
            )
    return list(options.systems)


def _split_overrides(overrides: Iterable[str], claims: Claims) -> dict[str | None, list[str]]:
    """'key=value' applies to every system, 'SYSTEM:key=value' to one."""
    split: dict[str | None, list[str]] = {}
    for text in overrides:
        head, sep, rest = text.partition(":")
        if sep and "=" not in head:
            if head not in claims.systems:
                raise ConfigError(
                    f"Override '{text}' names system '{head}', which {claims.path} does not have."
                    f"{did_you_mean(head, claims.systems)} Systems: {', '.join(claims.systems)}."
                )
            split.setdefault(head, []).append(rest)
        else:
            split.setdefault(None, []).append(text)
    return split


def _measured(config: str, overrides: list[str], **run_options: Any) -> dict[str, Any]:
    """`ablate.measure`'s record in its JSON form, which the comparison reads and writes out."""
    return measure(config, overrides, **run_options).to_dict()


def _measure_system(system, extra, layers_key, options, budget, progress, step) -> dict[str, Any]:
    counted = _measured(system.config, extra, count_only=True, device=options.device, dtype=options.dtype)
    if options.count_only:
        return _summary(system.name, system, counted, "count-only")
    dtype, cut, note = _form(system, extra, layers_key, options, budget or _budget(options), counted)
    while True:
        if dtype is None:
            return _summary(system.name, system, counted, "count-only", note=note)
        form = f"{dtype}" + (
            f", LLM {cut} of {system.llm_layers} layers, prefill scaled x{system.llm_layers / cut:g}" if cut else ""
        )

        def report(what: str, done: int, steps: int, form=form) -> None:
            progress(f"{step} ({form}): {what} {done}/{steps}")

        try:
            record = _measured(
                system.config,
                extra + ([f"{layers_key}={cut}"] if cut else []),
                progress=report,
                device=options.device,
                dtype=dtype,
                threads=options.threads,
                repeats=options.repeats,
                warmup=options.warmup,
            )
            break
        except ResourceError as exc:  # memory shrank since the form was chosen (a shared machine): the next smaller
            smaller = (cut or system.llm_layers or 0) // 2 if layers_key else 0
            if smaller < 1:
                dtype, note = None, f"counted only: {exc}"
            else:
                cut, note = (
                    smaller,
                    f"LLM cut to {smaller} of {system.llm_layers} layers to fit: prefill and TTFT are estimates",
                )
    summary = _summary(system.name, system, counted, form, note=note, timed=record)
    if cut:  # the prefill of L layers from k: the per-layer cost dominates (embedding and head are one token's)
        scale = system.llm_layers / cut
        latency = summary["latency_ms"]
        measured_prefill = latency["prefill"]
        latency["prefill"] = measured_prefill * scale
        latency["ttft"] = latency["ttft"] - measured_prefill + latency["prefill"]
        summary["estimate"] = True
    return summary


def _budget(options: Options) -> int | None:
    return available_memory(torch.device(options.device))


def _form(system, extra, layers_key, options, budget, counted) -> tuple[str | None, int | None, str | None]:
    """(dtype, LLM layers to cut to or None, note): the largest form of the system that fits the memory budget."""
    total = counted["params"]["total"]

    def fits(params: int, dtype: str) -> bool:
        return budget is None or params * torch.empty((), dtype=DTYPES[dtype]).element_size() * 1.2 <= budget

    layers = system.llm_layers
    capped = options.max_llm_layers is not None and layers is not None and layers > options.max_llm_layers
    # A CPU without bfloat16 instructions emulates it about 200x slower than float32 (measured: 0.17 vs 39 GFLOP/s
    # on an AVX2 core): a bfloat16 7B prefill would take hours, so cut the LLM in float32 instead.
    emulated = options.device == "cpu" and not cpu_features().bf16
    fallbacks = [] if emulated else ["bfloat16"]
    if not capped:
        for dtype in dict.fromkeys([options.dtype, *fallbacks]):
            if options.device == "cpu" and dtype == "float16":
                continue
            if fits(total, dtype):
                note = None if dtype == options.dtype else f"{options.dtype} does not fit the memory budget"
                return dtype, None, note
    skipped = " (bfloat16 would fit, but this CPU only emulates it)" if emulated and fits(total, "bfloat16") else ""
    if layers is None or layers_key is None:
        return (
            None,
            None,
            f"does not fit the memory budget{skipped} and its LLM depth (llm_layers) is unknown: counted only",
        )
    cut = min(options.max_llm_layers or layers, layers)
    while cut >= 1:
        cut_record = _measured(system.config, extra + [f"{layers_key}={cut}"], count_only=True, dtype=options.dtype)
        if fits(cut_record["params"]["total"], options.dtype):
            reason = ("--max-llm-layers" if capped else "the memory budget") + skipped
            return (
                options.dtype,
                cut,
                f"LLM cut to {cut} of {layers} layers for {reason}: prefill and TTFT are estimates",
            )
        cut //= 2
    return None, None, f"does not fit the memory budget{skipped} even with a one-layer LLM: counted only"


def _summary(name, system, record, form, note=None, error=None, timed=None) -> dict[str, Any]:
    record = record or {}
    source = timed or record
    latency = dict(source.get("latency_ms") or {})
    return {
        "system": name,
        "config": system.config,
        "overrides": system.overrides,
        "form": form,
        "estimate": False,
        "visual_tokens": record.get("visual_tokens"),
        "count_basis": source.get("count_basis"),
        "encoder_params": (record.get("params") or {}).get("encoder"),
        "params": (record.get("params") or {}).get("total"),
        "flops": record.get("flops") or {},
        "latency_ms": {key: latency.get(key) for key in (*STAGES, "ttft")},
        "threads": ((timed or {}).get("run") or {}).get("threads"),
        "note": note,
        "error": error,
    }


def _value(summary: dict[str, Any], metric: str) -> float | None:
    """The figure of one system that a metric's ratio divides."""
    return {
        "ttft": summary["latency_ms"]["ttft"],
        "encoder_ms": summary["latency_ms"]["encoder"],
        "tokens": summary["visual_tokens"],
        "encoder_params": summary["encoder_params"],
        "flops": summary["flops"].get("total"),
    }[metric]


def _ratio(baseline, fast) -> float | None:
    return baseline / fast if baseline is not None and fast else None


def _claim_row(claim: Claim, results: dict[str, dict[str, Any]], device: str = "", paper_hardware: str = "") -> dict:
    fast, base = results.get(claim.fast), results.get(claim.baseline)
    measured: dict[str, float | None] = dict.fromkeys(METRICS)
    if fast and base:
        measured = {key: _ratio(_value(base, key), _value(fast, key)) for key in METRICS}
    estimate = any(r and r["estimate"] for r in (fast, base))
    missing = [name for name in (claim.fast, claim.baseline) if name not in results]
    paper = {key: claim.paper.get(key) for key in METRICS}
    gaps = {}
    for key in METRICS:
        if not (paper[key] and measured[key]):
            continue
        apart = max(measured[key] / paper[key], paper[key] / measured[key])  # the same read either way round
        if apart > 1 + GAP:
            gaps[key] = {
                "paper": paper[key],
                "measured": measured[key],
                "apart": apart,
                "reason": _likely_reason(key, paper[key], fast, base, device, paper_hardware),
            }
    return {
        "claim": claim.claim,
        "source": claim.source,
        "fast": claim.fast,
        "baseline": claim.baseline,
        "paper": paper,
        "measured": measured,
        "estimate": estimate,
        "gaps": gaps,
        "forms": {name: results[name]["form"] for name in (claim.fast, claim.baseline) if name in results},
        "note": f"not measured: {', '.join(missing)} left out (--systems)" if missing else None,
    }


def _likely_reason(key: str, paper: float, fast: dict, base: dict, device: str, paper_hardware: str) -> str:
    """Why a measured ratio may sit far from the paper's, from what the two records say."""
    if key in ("tokens", "encoder_params"):
        # Which side differs cannot be told from a ratio; what the paper implies for the baseline, given the
        # FastVLM side as measured, usually shows it (e.g. a baseline counted without one of its stages).
        show = (lambda n: f"{n / 1e6:,.1f}M") if key == "encoder_params" else (lambda n: f"{n:,.0f}")
        what = "encoder" if key == "encoder_params" else "visual tokens"
        text = (
            f"With {fast['system']}'s {what} at {show(_value(fast, key))} as measured, the paper's {paper:.3g}× puts "
            f"{base['system']}'s at about {show(paper * _value(fast, key))}; measured {show(_value(base, key))}. "
        )
        if key == "encoder_params":
            return text + (
                "Likely a different variant or config, or another counting convention (a stage or head the paper "
                "counts or leaves out)."
            )
        bound = [s["system"] for s in (fast, base) if s.get("count_basis") == "upper bound"]
        return text + (
            "Likely another input resolution or reducer setting, or another token convention (CLS, image-newline "
            "tokens)." + (f" Counted here as an upper bound: {', '.join(bound)}." if bound else "")
        )
    if key == "flops":
        return (
            "Likely a counting convention (a multiply-add as one FLOP or two; attention counted here as full "
            "T×T on the meta device, not causal) or another resolution."
        )
    dtypes = ", ".join(dict.fromkeys(s["form"].split(",")[0] for s in (fast, base)))
    threads = ", ".join(dict.fromkeys(str(s["threads"]) for s in (fast, base) if s["threads"]))
    parts = [
        f"Timed here on {device} in {dtypes}"
        + (f" with {threads} thread(s)" if threads else "")
        + (f", the paper on {paper_hardware}" if paper_hardware else "")
        + ": latency ratios move with the hardware, the precision and the kernels each runs fast."
    ]
    stage = "encoder" if key == "encoder_ms" else "total"
    by_flops = _ratio(base["flops"].get(stage), fast["flops"].get(stage))
    if by_flops:  # what the work alone predicts, against which the measured ratio shows the hardware's hand
        what = "the encoders' FLOPs" if stage == "encoder" else "the FLOPs up to the first token"
        parts.append(f"{what[0].upper()}{what[1:]} alone would make the FastVLM side {oriented(by_flops, key)}.")
    if key == "ttft":
        shares = [
            f"{s['system']} {s['latency_ms']['encoder'] / s['latency_ms']['ttft']:.0%}"
            for s in (fast, base)
            if s["latency_ms"]["encoder"] and s["latency_ms"]["ttft"]
        ]
        if shares:
            parts.append(f"The encoder's share of TTFT here: {', '.join(shares)}.")
        if fast["estimate"] or base["estimate"]:
            parts.append("TTFT here is an estimate (an LLM cut to fewer layers, its prefill scaled).")
    adaptive = [s["system"] for s in (fast, base) if s.get("count_basis") == "measured image"]
    if adaptive:
        parts.append(
            f"{', '.join(adaptive)} keep(s) tokens by the image: on random weights that count, and its latency, "
            "say nothing about trained weights."
        )
    return " ".join(parts)


def _device_name(device: str) -> str:
    return device_name(torch.device(device))


# ------------------------------------------------------------------------------------------- reporting


def oriented(value: float | None, metric: str, estimate: bool = False) -> str:
    """A ratio baseline / FastVLM side in words: 3.2 is '3.2× faster'; below 1 the FastVLM side is behind, read
    inverted: 0.8 is '1.25× slower'."""
    if value is None:
        return "–"
    prefix = "~" if estimate else ""
    if round(value, 2) == 1:
        return f"{prefix}equal"
    if value > 1:
        return f"{prefix}{value:.3g}× {METRICS[metric].better}"
    return f"{prefix}{1 / value:.3g}× {METRICS[metric].worse}"


def _cell(row: dict[str, Any], key: str) -> str:
    """'paper / measured', the word once when both read the same way: '3.2× / ~2.47× faster'."""
    paper = oriented(row["paper"][key], key)
    measured = oriented(row["measured"][key], key, row["estimate"] and key == "ttft")
    head, _, word = paper.rpartition(" ")
    if head and measured.endswith(f" {word}"):
        paper = head
    return f"{paper} / {measured}" + (" ⚠" if key in row["gaps"] else "")


def flops_text(value: float | None) -> str:
    if value is None:
        return "–"
    for scale, unit in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
        if value >= scale:
            number = value / scale  # three significant digits: 3.00, 16.5, 487
            return f"{number:,.{2 if number < 10 else 1 if number < 100 else 0}f} {unit}"
    return f"{value:,.0f} FLOPs"


def _ms(value: float | None, estimate: bool = False) -> str:
    return "–" if value is None else f"{'~' if estimate else ''}{value:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    """The claims table, the gaps between paper and measurement with their likely reasons, then the systems table."""
    timed = result["mode"] != "count-only"
    lines = [
        f"## {result['title']}: re-measured on {result['device']} ({result['mode']})",
        "",
        "Each cell: the paper's ratio / the one measured here, baseline over FastVLM side (the first system named), "
        "read as what the FastVLM side gains: '3.2× faster' means the baseline takes 3.2× as long, '4× fewer' that it "
        "has 4× as many; a ratio below 1 is read inverted (0.8 is '1.25× slower'). "
        + ("`~`: an estimate (an LLM cut to fewer layers, its prefill scaled). " if timed else "")
        + f"⚠: more than {1 + GAP:g}× above or below the paper's (reasons below). "
        "FLOPs: the four stages up to the first token, counted on the meta device.",
        "",
        "| claim | FastVLM side vs baseline | " + " | ".join(m.title for m in METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for row in result["claims"]:
        claim = row["claim"] + (f" ({row['note']})" if row["note"] else "")
        cells = " | ".join(_cell(row, key) for key in METRICS)
        lines.append(f"| {claim} | {row['fast']} vs {row['baseline']} | {cells} |")
    gaps = [(row, key, gap) for row in result["claims"] for key, gap in row["gaps"].items()]
    if gaps:
        lines += ["", f"⚠ Measured more than {1 + GAP:g}× above or below the paper, with the likely reason:", ""]
        for row, key, gap in gaps:
            estimate = row["estimate"] and key == "ttft"
            lines.append(
                f"- {row['claim']}, {METRICS[key].title}: paper {oriented(gap['paper'], key)}, here "
                f"{oriented(gap['measured'], key, estimate)} ({gap['apart']:.3g}× apart). {gap['reason']}"
                + (f" Paper source: {row['source']}." if row["source"] else "")
            )
    latency = ["encoder ms", "prefill ms", "TTFT ms"] if timed else []
    columns = [
        "system",
        "config",
        "form",
        "visual tokens",
        "encoder params (M)",
        "encoder FLOPs",
        "FLOPs to first token",
    ]
    columns += latency + ["note"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for summary in result["systems"].values():
        params, flops = summary["encoder_params"], summary["flops"]
        bound = "≤" if summary.get("count_basis") == "upper bound" else ""
        cells = [
            summary["system"],
            " ".join([summary["config"], *summary["overrides"]]),
            summary["form"],
            f"{bound}{summary['visual_tokens']:,}" if summary["visual_tokens"] else "–",
            "–" if params is None else f"{params / 1e6:,.1f}",
            flops_text(flops.get("encoder")),
            (bound if flops.get("total") else "") + flops_text(flops.get("total")),
        ]
        if timed:
            ms, estimate = summary["latency_ms"], summary["estimate"]
            cells += [_ms(ms["encoder"]), _ms(ms["prefill"], estimate), _ms(ms["ttft"], estimate)]
        cells.append("; ".join(filter(None, [summary["note"], summary["error"]])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal stacked bars per system: the stages each timed alone, stacked (their sum), with the TTFT timed as
    one call marked on each bar; counted only, the FLOPs of each stage up to the first token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    systems = list(result["systems"].values())
    timed = result["mode"] != "count-only" and any(s["latency_ms"]["ttft"] for s in systems)
    unit, scale = "ms", 1.0
    if not timed:  # one unit for the axis, the largest that keeps the biggest bar above 10
        largest = max((s["flops"].get("total") or 0 for s in systems), default=0)
        unit, scale = next(
            ((u, f) for u, f in (("TFLOPs", 1e12), ("GFLOPs", 1e9)) if largest >= 10 * f), ("MFLOPs", 1e6)
        )
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(systems) + 1.8), layout="constrained")
    colors = dict(zip(STAGES, ("#4C72B0", "#DD8452", "#55A868", "#C44E52")))
    values = {
        s["system"]: {
            stage: (s["latency_ms"][stage] if timed else (s["flops"].get(stage) or 0) / scale) or 0.0
            for stage in STAGES
        }
        for s in systems
    }
    for y, summary in enumerate(systems):
        left = 0.0
        for stage, value in values[summary["system"]].items():
            hatch = "//" if timed and stage == "prefill" and summary["estimate"] else None
            ax.barh(y, value, left=left, color=colors[stage], hatch=hatch, edgecolor="white")
            left += value
        ttft = summary["latency_ms"]["ttft"]
        bound = "≤" if summary.get("count_basis") == "upper bound" else ""
        tokens = f"{bound}{summary['visual_tokens']:,} tokens" if summary["visual_tokens"] else "tokens –"
        if summary["error"] or (timed and not ttft):
            label = "not timed: " + ("failed" if summary["error"] else summary["form"])
        elif timed:
            tilde = "~" if summary["estimate"] else ""
            label = f"stage sum {tilde}{left:,.0f} ms, TTFT {tilde}{ttft:,.0f} ms, {tokens}"
            ax.plot([ttft], [y], marker="|", markersize=20, markeredgewidth=2.5, color="black")
        else:
            label = f"{bound}{flops_text(summary['flops'].get('total'))}, {tokens}"
        ax.text(max(left, ttft or 0), y, f"  {label}", va="center", fontsize=8)
    ax.set_yticks(range(len(systems)), [s["system"] for s in systems])
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter("{x:,.0f}" if timed else "{x:,g}")  # 120,000 ms reads at a glance
    # The legend names each stage; one too thin to see on every bar says so, rather than a swatch with no bar.
    widest = max((sum(v.values()) for v in values.values()), default=0) or 1
    handles = [
        Patch(
            color=colors[stage],
            label=stage if any(v[stage] >= 0.01 * widest for v in values.values()) else f"{stage} (<1%, not visible)",
        )
        for stage in STAGES
    ]
    if timed:
        handles.append(
            Line2D(
                [],
                [],
                marker="|",
                markersize=10,
                markeredgewidth=2,
                color="black",
                linestyle="",
                label="TTFT, timed as one call",
            )
        )
        if any(s["estimate"] for s in systems):
            handles.append(
                Patch(
                    facecolor="#C44E52",
                    hatch="//",
                    edgecolor="white",
                    label="prefill scaled from an LLM cut to fewer layers (estimate)",
                )
            )
        ax.set_xlabel("milliseconds, lower is faster; bars: the four stages each timed alone, stacked (the stage sum)")
    else:
        ax.set_xlabel(f"{unit} up to the first token by stage, counted on the meta device (fewer is cheaper)")
    ax.set_title(f"{result['title']}: {result['device']}, {result['mode']}", fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    ax.margins(x=0.45 if timed else 0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> dict[str, str]:
    """compare.md, compare.png and compare.json in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "compare.md", "plot": out / "compare.png", "json": out / "compare.json"}
    paths["markdown"].write_text(markdown(result))
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    try:
        plot(result, paths["plot"])
    except ImportError:  # the table is the result; the plot is an extra
        del paths["plot"]
        result.setdefault("notes", []).append(f"no plot: install matplotlib (pip install '{DISTRIBUTION}[plot]')")
    return {key: str(value) for key, value in paths.items()}
