"""Command-line plumbing shared by `dsv` and `echosim`: every error is one line.

    sys.exit(run_commands("dsv", {"train": train_main, ...}, sys.argv[1:]))

A command is `func(argv) -> int`. What it raises becomes one line on stderr,
`<prog> <command>: error: <message>`, and an exit status:

    UsageError, ValueError, a missing file (FileNotFoundError, ...)   -> 2, bad input
    Failure (a run that could not finish: non-finite loss, ...)         -> 1
    anything else                                                       -> 1, named as an internal error

`--traceback` anywhere on the command line re-raises instead, for the full traceback.
`Parser` is argparse with the same one-line form for its own errors.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

TRACEBACK_FLAG = "--traceback"
BAD_INPUT_STATUS, FAILURE_STATUS = 2, 1


class UsageError(ValueError):
    """Bad input from the user (a flag, a file, a config value); the message names it."""


class Failure(RuntimeError):
    """A run that could not finish for a reason the message explains (not a bug)."""


_BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(BAD_INPUT_STATUS, f"{self.prog}: error: {message}\n")


def run_commands(prog: str, commands: dict[str, Callable[[list[str]], int]], argv: Sequence[str],
                 *, describe: str = "") -> int:
    """Dispatch `argv[0]` to its command; turn what it raises into one line and an exit status."""
    argv = list(argv)
    show_traceback = TRACEBACK_FLAG in argv
    argv = [arg for arg in argv if arg != TRACEBACK_FLAG]
    names = ",".join(commands)
    if not argv or argv[0] in ("-h", "--help"):
        stream = sys.stdout if argv else sys.stderr
        print(f"usage: {prog} {{{names}}} [options]   ({prog} <command> --help; {TRACEBACK_FLAG} for tracebacks)",
              file=stream)
        if describe:
            print(describe, file=stream)
        return 0 if argv else BAD_INPUT_STATUS
    if argv[0] not in commands:
        print(f"{prog}: error: unknown command {argv[0]!r} (choose from {names})", file=sys.stderr)
        return BAD_INPUT_STATUS
    where = f"{prog} {argv[0]}"
    try:
        return commands[argv[0]](argv[1:]) or 0
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if show_traceback:
            raise
        status, message = classify(e)
        print(f"{where}: error: {message}", file=sys.stderr)
        return status


def classify(e: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) of an exception raised by a command."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, _BAD_INPUT):
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
            text = f"{text}: {e.filename}"
        return BAD_INPUT_STATUS, text
    if isinstance(e, Failure):
        return FAILURE_STATUS, text
    return FAILURE_STATUS, f"internal error: {type(e).__name__}: {text} (rerun with {TRACEBACK_FLAG} to see where)"
