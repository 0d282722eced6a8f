"""The `ablate` command line: run, grid, results, plot, compare, show, list, plugins, data, train, eval.

Results go to stdout (with --json, exactly one JSON object, also on failure); everything for people goes to stderr.
Bad input exits with code 2 and one paragraph that names the fix; an unexpected failure exits with 1, naming the
plugin (or ablate) and the log file holding the traceback (--debug prints it); Ctrl-C exits with 130.

Each command's handler lives in this package (`run`, `grids`, `compare`, `training`); flags that several commands
take are declared once (`flags`).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from rich.markup import escape

from ablate.api.errors import EXIT_INTERRUPTED, AblateError, UsageError, unexpected
from ablate.cli import compare, grids, run, training
from ablate.cli.output import err
from ablate.version import DISTRIBUTION, __version__


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is a UsageError (one paragraph, exit 2, a JSON record with --json)."""

    def error(self, message: str):
        raise UsageError(f"{message}. Run `{self.prog} --help` for the arguments.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ablate", description="Swap, time and count the parts of a VLM.")
    parser.add_argument("--version", action="version", version=f"ablate {__version__} (distribution {DISTRIBUTION})")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    run.add_commands(sub)
    grids.add_commands(sub)
    compare.add_commands(sub)
    training.add_commands(sub, _Parser)
    return parser


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
        except SystemExit as exc:  # --help, --version
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
        from ablate.api.registry import get_registry

        wrapped = unexpected(exc, f"running `ablate {' '.join(argv[:1])}`", get_registry().plugin_in_traceback(exc))
        wrapped.__cause__ = exc
        _report(wrapped, str(wrapped), wants_json, debug)
        return wrapped.exit_code


def _report(exc: BaseException, message: str, wants_json: bool, debug: bool) -> None:
    if wants_json:
        from ablate.measurement.measure import failed_record

        record = getattr(exc, "record", None) or failed_record(exc)
        print(json.dumps(record.to_dict()))
    if debug:
        original = exc.__cause__ or exc
        err.print("".join(traceback.format_exception(original)), highlight=False, markup=False)
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # `ablate[plot]` is text
