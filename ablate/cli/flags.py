"""Every flag that more than one command takes, declared once; a command takes the ones it needs as argparse parents.

Run flags each set the config key `run.NAME` of the same name and win over the config (a flag left out leaves the
config's value); `run_options(args)` collects the ones given.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_DB = "results/ablate.db"  # `ablate grid`, `results`, `plot` and `eval --db` share one store by default

# name -> argparse options; `help` ends with where the value goes (run.NAME) and its default there.
RUN_FLAGS: dict[str, dict[str, Any]] = {
    "warmup": dict(type=int, metavar="N", help="untimed repeats first (run.warmup, default 2)"),
    "repeats": dict(type=int, metavar="N", help="timed repeats; medians are reported (run.repeats, default 5)"),
    "precision": dict(
        type=float,
        metavar="P",
        help="repeat beyond --repeats until the TTFT median's relative standard error is at most P, e.g. 0.01 "
        "(run.precision, default: exactly --repeats)",
    ),
    "max_time_s": dict(
        type=float, metavar="S", help="time budget of the repeats under --precision (run.max_time_s, default 60)"
    ),
    "max_spread": dict(
        type=float,
        metavar="F",
        help="flag a TTFT whose interquartile range exceeds F x its median (run.max_spread, default 0.2)",
    ),
    "device": dict(help="cpu, cuda, cuda:N (run.device, default cpu)"),
    "dtype": dict(
        help="float32, bfloat16 or float16 for every component; run.dtypes.KIND=... sets one component's "
        "(run.dtype, default float32)"
    ),
    "threads": dict(type=int, metavar="N", help="torch CPU threads (run.threads, default: torch's choice)"),
    "runtime": dict(
        help="where the stages run: torch, or a runtime a plugin adds (`ablate plugins`) (run.runtime, default torch)"
    ),
    "mode": dict(help="eager, compile (torch.compile) or cudagraph (CUDA graphs, GPU) (run.mode, default eager)"),
    "memory_format": dict(
        help="contiguous or channels_last for the encoder's convolutions (run.memory_format, default contiguous)"
    ),
    "count_only": dict(
        action="store_const", const=True, help="tokens, params, FLOPs on the meta device; no weights (run.count_only)"
    ),
    "image": dict(metavar="PATH", help="a real image file instead of the synthetic one (run.image)"),
    "seed": dict(type=int, metavar="N", help="seed of random weights, image and prompt (run.seed, default 0)"),
    "fidelity": dict(
        action="store_const",
        const=True,
        help="first-token top-1 agreement and KL against the model without its reducer (run.fidelity)",
    ),
    "max_new_tokens": dict(
        type=int,
        metavar="N",
        help="also generate exactly N tokens with the KV cache (no stop at EOS) and time each (run.max_new_tokens, "
        "default 0: TTFT only)",
    ),
    "profile": dict(
        nargs="?",
        const="auto",
        metavar="TRACE",
        help="write a torch.profiler trace (Perfetto) and print the top kernels per stage (run.profile; without "
        "TRACE: ablate-trace-NAME-MODE.json)",
    ),
}

OTHER_FLAGS: dict[str, dict[str, Any]] = {
    "json": dict(action="store_true", help="print exactly one JSON object (the record) on stdout"),
    "debug": dict(action="store_true", help="print the traceback of an unexpected failure"),
    "db": dict(default=DEFAULT_DB, metavar="PATH", help=f"the SQLite results store (default {DEFAULT_DB})"),
    "wandb": dict(action="store_true", help="log to W&B (also: `wandb: true` in the config)"),
}


def parent(*names: str, defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """A parent parser holding the named shared flags, for `add_parser(..., parents=[...])`. `defaults`: a command's
    own defaults for some of them (its help says so instead of the config's)."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in names:
        options = dict(RUN_FLAGS.get(name) or OTHER_FLAGS[name])
        if defaults and name in defaults:
            options["default"] = defaults[name]
            options["help"] = options["help"].rsplit(" (", 1)[0] + f" (default {defaults[name]})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **options)
    return parser


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run flags given on the command line, as `run.` keys."""
    return {name: getattr(args, name) for name in RUN_FLAGS if getattr(args, name, None) is not None}


# The run flags of commands that measure one config or a grid of them (`ablate run` adds --profile).
MEASURE_FLAGS = tuple(name for name in RUN_FLAGS if name != "profile")
