"""User-facing errors.

Every error a user can cause by bad input derives from `AblateError`: the CLI prints its message as one paragraph,
without a traceback, and exits with code 2; library callers catch it by type. Messages name the problem and the fix.

Two kinds of failure are not bad input, and exit with code 1: `PluginFailure` (a plugin raised something it did not
mean to, e.g. a bug, or an input it does not validate) and `InternalError` (a bug in ablate itself). Their message
names the culprit and where the full traceback was written; `--debug` prints it.

An error raised while measuring carries the partial result record as `error.record` (see `ablate.measurement.record`),
so a failed run loses nothing that was measured before the failure.
"""

from __future__ import annotations

import difflib
import os
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
LOG_DIR_ENV = "ABLATE_LOG_DIR"  # where tracebacks of unexpected failures go (default ~/.cache/ablate/logs)


class AblateError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in ablate."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(AblateError):
    """A config value or key is wrong."""


class UsageError(ConfigError):
    """A command-line argument is wrong (unknown flag, a value of the wrong type)."""


class UnknownComponentError(ConfigError):
    """A component name is not registered."""


class ImageSizeError(ConfigError):
    """An encoder cannot take the requested input size. `valid`: sizes near it that the encoder takes, when the
    encoder knows them (`encoder.image_size_fit=nearest` picks the nearest)."""

    def __init__(self, message: str, valid: Iterable[int] = ()):
        super().__init__(message)
        self.valid = tuple(valid)


class IncompatibleComponentsError(ConfigError):
    """Two components cannot work together (e.g. a reducer needs what the encoder cannot give)."""


class PluginError(AblateError):
    """A plugin failed to load or register (raised only in strict mode or for direct use)."""


class CheckpointError(AblateError):
    """A checkpoint cannot be read or does not match the architecture."""


class DataError(AblateError):
    """A training or evaluation record, image or tokenizer is malformed, missing or unreadable."""


class ResourceError(AblateError):
    """The run would not fit the machine (memory), or the device it asks for is not here."""


class PluginFailure(AblateError):
    """A plugin raised an unexpected exception (a bug, or an input it does not check). Not the user's fault."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, plugin: str | None = None, log: str | None = None):
        super().__init__(message)
        self.plugin = plugin
        self.log = log


class InternalError(PluginFailure):
    """An unexpected exception in ablate itself: a bug to report."""


def closest(name: str, options: Iterable[str]) -> str | None:
    """The option most similar to `name`, if any is reasonably close."""
    matches = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' Did you mean 'x'?' or ''."""
    match = closest(name, options)
    return f" Did you mean '{match}'?" if match else ""


def first_line(what: BaseException | str | None, *, with_type: bool = False, width: int | None = None) -> str:
    """The first line of an exception's message (or of a text), whitespace collapsed: for one-paragraph messages.

    An exception without a message gives its type's name; `with_type` puts the type first ('ValueError: ...');
    `width` cuts a longer line with '...'. OmegaConf's errors keep the message proper in `.msg`.
    """
    if isinstance(what, BaseException):
        text = getattr(what, "msg", None) or str(what)
    else:
        text = str(what or "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = " ".join(lines[0].split()) if lines else ""
    if isinstance(what, BaseException):
        name = type(what).__name__
        line = f"{name}: {line}" if with_type and line else (line or name)
    if width is not None and len(line) > width:
        line = line[: width - 3] + "..."
    return line


def out_of_memory(exc: BaseException) -> bool:
    """A CPU MemoryError or torch's device out-of-memory error."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def write_traceback(exc: BaseException) -> str | None:
    """Write the exception's full traceback to a log file and return its path (None if it cannot be written)."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".cache" / "ablate" / "logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text("".join(traceback.format_exception(exc)))
        return str(path)
    except OSError:
        return None


def unexpected(exc: Exception, what: str, plugin: str | None = None) -> PluginFailure:
    """Wrap an unexpected exception raised while doing `what`, blaming `plugin` (None: ablate itself)."""
    log = write_traceback(exc)
    where = f"The full traceback is in {log}; " if log else ""
    detail = f"{type(exc).__name__}: {str(exc).strip() or '(no message)'}"  # the whole message: it is a bug report
    if plugin is None:
        return InternalError(
            f"Internal error in ablate while {what}: {detail}. This is a bug in ablate. {where}rerun with --debug to "
            f"print it, and please report it.",
            log=log,
        )
    return PluginFailure(
        f"Plugin '{plugin}' failed while {what}: {detail}. This is a bug in the plugin or an input it does not "
        f"check. {where}rerun with --debug to print it; `ablate plugins` shows the plugin's version.",
        plugin=plugin,
        log=log,
    )
