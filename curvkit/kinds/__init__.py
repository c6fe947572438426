"""Analysis kinds: the one table of what ``curvkit analyze`` computes, stores, reads, prints and draws.

A run of ``curvkit analyze`` holds analyses addressed as ``"kind/name"``
(``"eigen/largest"``, ``"trace/hutch++"``, ``"ihvp/gradient"``). Each kind is one
:class:`AnalysisKind`, one row of one table, which names everything the library
does with its results:

========== ================================================================
column     what it does
========== ================================================================
keys       which analyses of the kind a plan asks for, in order
request    the options that determine a result (a resumed run reuses a
           stored result only when its request is the same)
compute    the result, from an :class:`AnalysisContext`
write      fills an HDF5 group (h5py) with the result; ``read`` rebuilds it
rows       its numbers as ``(quantity, item, value)``: ``curvkit export --format csv``
summarize  one line: ``curvkit analyze``'s summary and ``curvkit show``
tables     ``curvkit show``'s tables of a run's results of the kind (or one
           line each)
figures    ``curvkit plot``'s figures of one result
========== ================================================================

so :func:`curvkit.analysis.run_plan`, :mod:`curvkit.store`,
:mod:`curvkit.summaries`, :mod:`curvkit.plotting` and the command line look a
kind up here instead of testing result types. The built-in kinds are
:data:`BUILTIN_KINDS` (``eigen``, ``trace``, ``density``, ``checks``,
``per_layer``, ``compare``, ``ihvp``); a plugin adds kinds through the
``curvkit_register_analysis_kinds`` hook, its options coming from
``AnalysisPlan(options={kind: {...}})``. :func:`analysis_kinds` lists them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from curvkit.errors import CurvkitError
from curvkit.kind_spec import BUILTIN_KINDS, AnalysisContext, AnalysisKind, ResultTable, Row

__all__ = [
    "BUILTIN_KINDS",
    "AnalysisContext",
    "AnalysisKind",
    "ResultTable",
    "Row",
    "analysis_kinds",
    "builtin_kinds",
    "plan_kinds",
]


def builtin_kinds() -> dict[str, AnalysisKind]:
    """The built-in kinds by name, in :data:`BUILTIN_KINDS` order (no plugin loaded)."""
    import importlib

    return {name: importlib.import_module(f"curvkit.kinds.{name}").KIND for name in BUILTIN_KINDS}


def analysis_kinds() -> dict[str, AnalysisKind]:
    """Every analysis kind by name: the built-ins, then those plugins register, in order."""
    from curvkit.registry import items

    return {**builtin_kinds(), **items("analysis_kinds")}


def plan_kinds(options: Mapping[str, Any]) -> dict[str, AnalysisKind]:
    """The kinds a plan may run: the built-ins, and the plugins' kinds it names in ``options``.

    A plugin's kind runs only when asked for (its name in ``AnalysisPlan.options``),
    so that a plan without any loads no plugin.

    Raises:
        CurvkitError: ``options`` names a kind that does not exist or takes no options.
    """
    kinds = builtin_kinds()
    if any(name not in kinds for name in options):
        everything = analysis_kinds()
        kinds.update({name: everything[name] for name in options if name in everything})
    for name in options:
        if name not in kinds or kinds[name].check is None:
            takes = [k for k, kind in analysis_kinds().items() if kind.check is not None]
            raise CurvkitError(f"no analysis kind {name!r} takes options; these do: {', '.join(takes)}")
    return kinds
