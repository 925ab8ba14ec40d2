"""How a command ends on a mistake it expected: one line, never a traceback.

Every entry point (``modlm``, ``python -m modlm.training``, the benchmark scripts) runs its work
under ``run_cli``. An expected failure (bad input the user can fix, or the machine saying no)
prints ``{prog}: error: {message}`` on stderr, on one line, and returns 2:

- ``ValueError``: a bad value (configs and checks name the field and the value);
- ``OSError`` and its family (``FileExistsError``, ``PermissionError``, ``NotADirectoryError``,
  ``IsADirectoryError``, ``FileNotFoundError``, a full disk...), shown as "what: which path";
- ``FloatingPointError``: a run that diverged;
- ``ImportError``: an optional package a feature needs is missing (the message says which and
  how to install it).

Ctrl-C (``KeyboardInterrupt``) prints ``{prog}: interrupted`` and returns 130, the shell's code
for a process ended by SIGINT. Anything else is a bug and keeps its traceback. With
``MODLM_DEBUG=1`` in the environment, expected failures keep theirs too.

``ArgumentParser`` is argparse with the same one-line errors (no usage block): flag typos end
like every other mistake. Its ``--help`` shows each option's default (``ShowDefaults``), whatever
formatter class a command asks for.

No torch import: ``modlm --help`` stays instant.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "DEBUG_ENV",
    "EXPECTED",
    "ArgumentParser",
    "ShowDefaults",
    "one_line",
    "report",
    "run_cli",
    "shown_default",
    "states_default",
]

# The failures a user can cause and fix; their message is the whole story.
EXPECTED: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, ImportError)
DEBUG_ENV = "MODLM_DEBUG"
EXIT_ERROR = 2  # argparse's status for bad usage; every expected failure shares it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C


def debugging() -> bool:
    """``MODLM_DEBUG`` is set to something other than "", "0" or "false"."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line.

    An ``OSError`` raised by the OS ("[Errno 13] Permission denied: 'runs/x'") reads
    "Permission denied: runs/x"; one raised by our code with its own message keeps it. A
    message of several lines is joined into one; an empty one becomes the exception's type.
    """
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        what = e.strerror
        path = os.fsdecode(e.filename)
        if isinstance(e, FileExistsError) and os.path.exists(path) and not os.path.isdir(path):
            # mkdir on a regular file: "File exists" alone reads as if a directory were in the way.
            what = "File exists and is not a directory"
        text = f"{what}: {path}"
        if e.filename2 is not None:
            text += f" -> {os.fsdecode(e.filename2)}"
    else:
        text = str(e)
    text = " ".join(text.split())
    return text or type(e).__name__


def report(e: BaseException, prog: str = "modlm") -> int:
    """Print the one line for an expected failure ``e`` and return the exit status (2, or 130 for Ctrl-C).

    Re-raises ``e`` when it is not expected, or when ``MODLM_DEBUG`` asks for the traceback.
    """
    if debugging() or not isinstance(e, (*EXPECTED, KeyboardInterrupt)):
        raise e
    if isinstance(e, KeyboardInterrupt):
        _say(f"{prog}: interrupted")
        return EXIT_INTERRUPTED
    _say(f"{prog}: error: {one_line(e)}")
    return EXIT_ERROR


def _say(line: str) -> None:
    # One write of the whole line: processes sharing stderr (DDP ranks under torchrun) then never
    # interleave inside a line, as print's separate write of the newline can when unbuffered.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_cli(fn: Callable[..., Any], *args: Any, prog: str = "modlm") -> int:
    """``fn(*args)`` as a command: its int result is the exit status (anything else is 0), an
    expected failure is one line on stderr (see ``report``)."""
    try:
        rc = fn(*args)
    except (*EXPECTED, KeyboardInterrupt) as e:
        return report(e, prog)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def shown_default(action: argparse.Action) -> bool:
    """Whether ``--help`` should state ``action``'s default: an option (or optional positional)
    that takes a value and has one. ``None``, an empty string or list ("not given") and a flag's
    own ``False``/``True`` (``store_true``: its absence is the default) would only be noise."""
    default = action.default
    if default is None or default is argparse.SUPPRESS or default in ("", [], ()):
        return False
    if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
        return False  # store_true / store_const / count / help / version
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def states_default(help_text: str, default: Any) -> bool:
    """Whether a help text already states ``default``: by ``%(default)s``, or in words (the word
    "default" and the value, as in "default 1: the machine is shared")."""
    if "%(default)" in help_text:
        return True
    return re.search(r"\bdefault\b", help_text, re.IGNORECASE) is not None and str(default) in help_text


class ShowDefaults(argparse.HelpFormatter):
    """A help formatter (mixed into whichever class a parser names) that ends each option's help
    with ``(default: X)`` unless the help already states it (``states_default``), and gives an option without a help text that line alone."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if shown_default(action) and not states_default(text, action.default):
            text += " (default: %(default)s)" if text.strip() else "default: %(default)s"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help and action.help.strip()) and shown_default(action):
            # argparse formats no help line at all without a help text; give it one for the default.
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


@functools.cache
def _showing_defaults(formatter_class: type) -> type:
    """``formatter_class`` with ``ShowDefaults`` first in its MRO. ``ShowDefaults`` overrides
    ``_get_help_string`` whole, so argparse's ``ArgumentDefaultsHelpFormatter``, when named, adds
    neither "(default: None)" nor a second default."""
    if issubclass(formatter_class, ShowDefaults):
        return formatter_class
    return type(f"ShowDefaults{formatter_class.__name__}", (ShowDefaults, formatter_class), {})


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``{prog}: error: {message} (see {prog} --help)``, exit 2,
    and whose ``--help`` shows each option's default (``ShowDefaults``, mixed into the
    ``formatter_class`` given, so ``RawDescriptionHelpFormatter`` keeps its layout).

    Subparsers made with ``add_subparsers`` are of this class too.
    """

    def __init__(self, *args: Any, formatter_class: type = argparse.HelpFormatter, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=_showing_defaults(formatter_class), **kwargs)

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
