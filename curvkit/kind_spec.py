"""The description of an analysis kind (what ``curvkit_register_analysis_kinds`` returns).

The table of kinds, and the built-in kinds themselves, are in :mod:`curvkit.kinds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUILTIN_KINDS", "AnalysisContext", "AnalysisKind", "ResultTable", "Row", "Series"]

Row = tuple[str, Any, Any]
"""``(quantity, item, value)``: one number of a result in the CSV export."""


@dataclass(frozen=True)
class ResultTable:
    """A table for ``curvkit show``: plain text cells, drawn by the command line.

    Attributes:
        title: Above the table.
        columns: Column headings.
        rows: One list of cells per row.
        notes: Lines printed under the table (what does not fit in a cell).
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    notes: Sequence[str] = ()


@dataclass
class AnalysisContext:
    """What an analysis may use besides its plan: the operator and what the run has at hand.

    Attributes:
        op: The curvature operator analysed (``op.name`` is its estimator's name
            when :func:`curvkit.curvature` built it).
        plan: The :class:`~curvkit.AnalysisPlan`.
        computed: Results of this run computed so far in this call, by key.
        known: Results read back from the file (a resumed run), by key.
        reference: The estimator's reference for ``checks/agreement``
            (:class:`curvkit.analysis.Reference`), or ``None``.
        baseline: The :class:`curvkit.analysis.Baseline` of ``compare/<name>``, or ``None``.
        precise: Returns the same curvature in float64 (for reference solves), or ``None``.
        report: ``report(key)`` gives the progress callback of analysis ``key`` (or ``None``).
    """

    op: Any
    plan: Any
    computed: dict[str, Any] = field(default_factory=dict)
    known: Mapping[str, Any] = field(default_factory=dict)
    reference: Any = None
    baseline: Any = None
    precise: Callable[[], Any] | None = None
    report: Callable[[str], Any] = lambda key: None

    def get(self, key: str) -> Any:
        """A result of this run at hand: computed in this call, else read back; ``None`` if neither."""
        found = self.computed.get(key)
        return found if found is not None else self.known.get(key)


def _no_tables(items: Sequence[tuple[str, Any]]) -> list[ResultTable] | None:
    return None


def _no_figures(result: Any, title: str, log: bool) -> list[tuple[str, Any]]:
    return []


Series = dict[str, tuple[float, float]]
"""A trajectory figure's lines at one checkpoint: label -> ``(value, error bar)``."""


def _no_trajectory(key: str, result: Any) -> dict[str, tuple[str, Series]]:
    return {}


@dataclass
class AnalysisKind:
    """One kind of analysis: how it is computed, stored, read back, summarised and drawn.

    Attributes:
        name: The kind, the first part of its keys (``"eigen"``) and its group in a run.
        result_type: The class of its results.
        keys: ``keys(plan, psd, estimator) -> list[str]``: the analyses of this
            kind the plan asks for on an operator (``psd``: the operator claims
            to be positive semi-definite; ``estimator``: its name).
        request: ``request(plan, key) -> dict``: the JSON-able options that
            determine the result of ``key``.
        compute: ``compute(context, key) -> result`` (an :class:`AnalysisContext`).
        write: ``write(group, result)``: fill an h5py group (see :mod:`curvkit.kinds.hdf5`).
        read: ``read(group) -> result``.
        rows: ``rows(result)``: its numbers as :data:`Row` s.
        summarize: ``summarize(result) -> str``: one line.
        check: ``check(options)``: validates ``AnalysisPlan.options[name]``
            (raises :class:`~curvkit.CurvkitError`); ``None``: the kind takes none.
        tables: ``tables([(key, result), ...])``: ``curvkit show``'s tables of a
            run's results of this kind; ``None`` (the default) prints one line each.
        figures: ``figures(result, title, log) -> [(suffix, axes), ...]`` for ``curvkit plot``.
        trajectory: ``trajectory(key, result) -> {stem: (ylabel, {label: (value, error)})}``:
            the numbers ``curvkit plot`` draws across the checkpoints of a trajectory,
            one figure per ``stem`` (``trajectory-<n>-<estimator>-<stem>``), one line per
            label (``""``: the figure's only line). A line is drawn when every
            checkpoint has it.
        check_dimension: ``check_dimension(options, P, N)``: validates the options against
            the number of parameters analysed ``P`` and the number of samples of the
            operator's data ``N`` (``None`` for an operator without data), once they are
            known and before anything is written or computed
            (:meth:`curvkit.AnalysisPlan.check_dimension`: a vector of the wrong size, a
            rank above ``P``, a mini-batch above ``N``); raises a one-line
            :class:`~curvkit.CurvkitError`. ``None``: nothing depends on ``P`` or ``N``.
        plugin: Set by the registry for a plugin's kind.
    """

    name: str
    result_type: type
    keys: Callable[[Any, bool, str | None], list[str]]
    request: Callable[[Any, str], dict[str, Any]]
    compute: Callable[[AnalysisContext, str], Any]
    write: Callable[[Any, Any], None]
    read: Callable[[Any], Any]
    rows: Callable[[Any], Iterable[Row]]
    summarize: Callable[[Any], str]
    check: Callable[[Mapping[str, Any]], None] | None = None
    tables: Callable[[Sequence[tuple[str, Any]]], list[ResultTable] | None] = _no_tables
    figures: Callable[[Any, str, bool], list[tuple[str, Any]]] = _no_figures
    trajectory: Callable[[str, Any], dict[str, tuple[str, Series]]] = _no_trajectory
    check_dimension: Callable[[Mapping[str, Any], int, int | None], None] | None = None
    plugin: str = ""


BUILTIN_KINDS = ("eigen", "trace", "density", "checks", "per_layer", "compare", "ihvp", "summary")
"""The built-in kinds, in the order a run computes and lists them (modules of :mod:`curvkit.kinds`)."""
