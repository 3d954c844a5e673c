"""How every failure of the ``fastport`` command becomes one line on stderr and an exit code.

``fastport_anyio.cli.main`` runs each subcommand under :func:`report_failure`, the only place that turns an
exception into what the user sees, so no subcommand can leak a traceback (docs/operations.md, "The
fastport command"). Exceptions from anyio task groups arrive wrapped in ``ExceptionGroup``; they are
unwrapped here, once, to the error that says what went wrong.

Exit codes: 0 success; 1 runtime failure (unreachable server, refused credentials, unconfirmed publish,
connection given up, and any unexpected error); 2 usage or configuration error (bad flags, environment,
config file, key, URL, topic); 130 interrupted (Ctrl-C). An unexpected exception (a bug) is one line that
asks for a report; ``--debug`` or ``FASTPORT_DEBUG=1`` adds the traceback, for every error.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Final, TextIO

from fastport_core.config_file import ConfigError
from fastport_core.errors import (
    AuthenticationError,
    FastportError,
    LocalProtocolError,
)

from .store import StoreError, StoreUnavailable

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "UsageError",
    "debug_requested",
    "describe",
    "report_failure",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


class CommandError(Exception):
    """A failure to report as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CommandError):
    """A problem with the command line, the environment or a file the user named: exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def describe(error: BaseException) -> tuple[str, int] | None:
    """The one line and exit code for an error the command knows; ``None`` for anything else (a bug)."""
    if isinstance(error, CommandError):
        return str(error), error.exit_code
    if isinstance(error, ConfigError | LocalProtocolError):  # the user's input: a flag, a topic, a file
        return str(error), EXIT_USAGE
    if isinstance(error, StoreUnavailable):  # may pass (a full disk): a runtime failure
        return str(error), EXIT_FAILURE
    if isinstance(error, StoreError):  # a store file the user named that cannot be used
        return str(error), EXIT_USAGE
    if isinstance(error, AuthenticationError):
        return f"authentication refused: {error}", EXIT_FAILURE
    if isinstance(error, FastportError):  # a runtime failure the client reports (connect, timeout, ...)
        return str(error) or type(error).__name__, EXIT_FAILURE
    if isinstance(error, BrokenPipeError):  # `fastport sub t | head -1`: the reader went away
        return "output closed (broken pipe)", EXIT_FAILURE
    if isinstance(error, OSError):
        return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else ""), EXIT_FAILURE
    return None


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again on the closed
    pipe (and print its own "Exception ignored" lines)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (tests capture it): nothing will flush into a pipe
        pass
    finally:
        os.close(devnull)


def debug_requested(flag: bool, environ: Mapping[str, str]) -> bool:
    """``--debug`` or ``FASTPORT_DEBUG`` set to anything but empty, ``0``, ``false`` or ``no``."""
    return flag or environ.get("FASTPORT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def report_failure(command: str, error: BaseException, *, debug: bool, stderr: TextIO | None = None) -> int:
    """Print ``error`` as one ``fastport COMMAND: ...`` line on stderr; return its exit code.

    In a group, an interruption wins, then the first error the command knows, then the first one.
    ``SystemExit`` is never passed here (the caller lets it through).
    """
    out = sys.stderr if stderr is None else stderr
    leaves = list(_leaves(error))
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return EXIT_INTERRUPTED
    if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
        _discard_stdout()
    known = [(leaf, described) for leaf in leaves if (described := describe(leaf)) is not None]
    if debug:
        traceback.print_exception(error, file=out)
    if known:
        _leaf, (message, code) = known[0]
    else:
        leaf = leaves[0]
        message = f"unexpected error: {type(leaf).__name__}: {leaf} (a bug in fastport: please report it" + (
            ", with the traceback above)" if debug else ", with the traceback that --debug shows)"
        )
        code = EXIT_FAILURE
    print(f"fastport {command}: {message}", file=out, flush=True)
    return code
