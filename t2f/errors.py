"""t2f's own errors: the one base type of every error t2f raises for a user to read.

A `T2FError` says what is wrong with the user's input, files, machine or request in one line, and
the command-line tools show it as one `Error:` line with a non-zero exit. Anything else that escapes
(a ValueError from a bug, say) is a defect and keeps its traceback. Subclasses may also derive from
the built-in type a caller would expect (`OSError` for a path, `ValueError` for an argument).
"""

from __future__ import annotations


class T2FError(Exception):
    """An error of t2f's own, with a one-line message meant for the user."""
