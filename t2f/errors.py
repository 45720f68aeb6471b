"""t2f's own errors: the one base type of every error t2f raises for a user to read.

A `T2FError` says what is wrong with the user's input, files, machine or request in one line, and
the command-line tools show it as one `Error:` line with a non-zero exit. Anything else that escapes
(a ValueError from a bug, say) is a defect and keeps its traceback. Subclasses may also derive from
the built-in type a caller would expect (`OSError` for a path, `ValueError` for an argument).

Each module declares the errors of its own subject (WeightsError, ExportError, RunError, ...);
`UsageError` is the one shared by every module for a value the caller got wrong.
"""

from __future__ import annotations

import re


class T2FError(Exception):
    """An error of t2f's own, with a one-line message meant for the user."""


class UsageError(T2FError, ValueError):
    """A value t2f was given and refuses: an argument or option outside its range, a name it does not know, or values
    that do not go together (fp16 on a CPU, a bank made with other CLIP weights, models whose sizes disagree)."""


def first_line(error: BaseException, typed: bool = False, limit: int | None = None, skip: re.Pattern | None = None) -> str:
    """One line for an exception t2f reports in its own words: the first non-blank line of its message that `skip` does
    not match (a library's own preamble, such as OpenVINO's source locations), stripped and cut to `limit` characters;
    after its type name and ": " where `typed`; its type name alone where no such line is left."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not (skip and skip.match(line.strip()))]
    if not lines:
        return type(error).__name__
    line = lines[0] if limit is None else lines[0][:limit]
    return f"{type(error).__name__}: {line}" if typed else line
