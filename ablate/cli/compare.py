"""`ablate compare`: re-measure a paper's claims (FastVLM vs its baselines) here: a Markdown table and a TTFT plot."""

from __future__ import annotations

import json
from pathlib import Path

from ablate.api.errors import ConfigError
from ablate.cli.flags import parent
from ablate.cli.output import err, out


def add_commands(sub) -> None:
    compare = sub.add_parser(
        "compare",
        parents=[
            parent("json", "debug", "count_only", "threads"),
            # The comparison's own defaults: each system timed briefly; float32 first, then bfloat16 if that fits.
            parent(
                "device",
                "dtype",
                "repeats",
                "warmup",
                defaults=dict(device="cpu", dtype="float32", repeats=3, warmup=1),
            ),
        ],
        help="re-measure a paper's claims (FastVLM vs its baselines) here: Markdown table and TTFT plot",
    )
    compare.add_argument("claims", nargs="?", default="fastvlm", help="claims name or YAML path (default: fastvlm)")
    compare.add_argument("overrides", nargs="*", help="key=value for every system, SYSTEM:key=value for one")
    compare.add_argument(
        "--systems", help="comma-separated subset of the file's systems (default: all its claims need)"
    )
    compare.add_argument(
        "--max-llm-layers", type=int, help="cut deeper LLMs to this many layers and scale their prefill (estimate)"
    )
    compare.add_argument("--memory-gb", type=float, help="memory budget for weights (default: what is available now)")
    compare.add_argument(
        "--out", default="ablate-compare", help="folder for compare.md/.png/.json (default ./ablate-compare)"
    )
    compare.set_defaults(handler=cmd_compare)


def cmd_compare(args) -> int:
    from ablate.report.compare import Options, compare, load_claims, markdown, write

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
        count_only=bool(args.count_only),
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
        out.print(markdown(result), highlight=False, markup=False, soft_wrap=True)
        err.print(f"wrote {', '.join(result['files'].values())}")
    return 0
