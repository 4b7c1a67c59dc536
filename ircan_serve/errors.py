"""The one exception type for errors a user can cause and fix.

Bugs raise ordinary Python exceptions with tracebacks; everything a user can act on (a bad
path, a malformed data row, an unsupported architecture, a folder that already exists) is an
:class:`IrcanError` whose message says what went wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class IrcanError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def table_entry(table: Mapping[str, T], name: str, what: str, where: str, choices: Iterable[str] | None = None) -> T:
    """``table[name]``, or an error naming the entries there are (``choices``, default the table's
    keys) and where the table lives (``where``, e.g. ``ircan_serve/data/contexts.py:CONTEXTS``)."""
    try:
        return table[name]
    except KeyError:
        raise IrcanError(f"{what} {name!r} does not exist; {what.split()[-1]}s: "
                         f"{', '.join(choices if choices is not None else table)} ({where})") from None
