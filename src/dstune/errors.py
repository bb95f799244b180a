"""The one base class of the errors a user can fix, and the generic one for a bad value.

The CLI catches ``DstuneError`` alone and prints its message without a traceback: the message says what
was wrong (the file and line, or the config key) and what would be accepted. Anything else that escapes
is a bug and shows its traceback, so it can be reported.
"""

from __future__ import annotations


class DstuneError(Exception):
    """A problem the user can fix (bad input, config, file or state); its message says how."""


class UsageError(DstuneError, ValueError):
    """A bad value given to a command or a library function (an option, a range, a file's content)."""


class MissingExtra(DstuneError, ImportError):
    """An optional dependency the config asks for is not installed; the message names the extra."""
