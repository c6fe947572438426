"""One-line message pieces shared by the checkpoint modules."""

from __future__ import annotations

from collections.abc import Iterable

from curvkit.errors import describe_error, first_line, one_line

LIST_LIMIT = 5
"""Names listed in one-line messages before ``(+N more)``."""


def exc_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line: the first line (its first sentence if long)."""
    first = first_line(exc)
    if len(first) > 120 and ". " in first:
        first = first[: first.index(". ") + 1]
    return one_line(describe_error(exc, first), 200)


def counted(n: int, noun: str) -> str:
    """``1 missing key``, ``3 missing keys``, ``2 shape mismatches``, ``2 entries``."""
    if n == 1:
        return f"{n} {noun}"
    if noun.endswith("ch"):
        return f"{n} {noun}es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return f"{n} {noun[:-1]}ies"
    return f"{n} {noun}s"


def listing(names: Iterable[str], limit: int = LIST_LIMIT) -> str:
    """``a, b, c (+4 more)``."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
