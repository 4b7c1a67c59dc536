"""The one exception type for errors a user can cause and fix.

Bugs raise ordinary Python exceptions with tracebacks; everything a user can act on (a bad
path, a malformed data row, an unsupported architecture, a folder that already exists) is an
:class:`IrcanError` whose message says what went wrong and what to do.
"""

from __future__ import annotations


class IrcanError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
