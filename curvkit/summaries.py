"""One line per result, for terminals: ``curvkit analyze``'s summary and ``curvkit show``.

:func:`summarize` looks the result's kind up in the one table of analysis kinds
(:mod:`curvkit.kinds`), so that every result kind is described in one place.

Example:
    >>> import torch
    >>> from curvkit import TraceResult
    >>> summarize(TraceResult(12.5, 0.25, "hutch++", 30, None, 0))
    '12.5 +- 0.25 (hutch++, 30 products)'
"""

from __future__ import annotations

from typing import Any

__all__ = ["summarize"]


def summarize(result: Any) -> str:
    """One line describing ``result`` (a result of any analysis kind, a plugin's too)."""
    from curvkit.kinds import analysis_kinds

    for kind in analysis_kinds().values():
        if type(result) is kind.result_type:
            return kind.summarize(result)
    return type(result).__name__
