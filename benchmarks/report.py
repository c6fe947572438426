"""Writing the results: ``RESULTS.md`` (tables) and ``results.json`` (everything).

A run of some sections (``--only``, ``--problems``) *merges* into the recorded
results: :func:`load_recorded` reads ``results.json`` back into the result
objects, :func:`merge_recorded` replaces the entries (section, problem) that
the run measured and keeps the others, and ``provenance`` in ``results.json``
says, per section, which run recorded which problems (commit, date, command and
that run's settings). The goals are evaluated again over the merged results;
the Markdown is rendered from them, with a provenance table when sections come
from more than one run.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from benchmarks.distributed import DistributedResult, evaluate_distributed_goals, render_distributed
from benchmarks.ggn import AGREEMENT, GGNResult, GGNRow, evaluate_ggn_goals
from benchmarks.hvp import Goal, K, ProblemResult, evaluate_goals
from benchmarks.kfac import DAMPING, KFACResult, evaluate_kfac_goals
from benchmarks.newton import NewtonResult, render_newton
from benchmarks.optimizers import OptimizersResult, evaluate_optimizer_goals, render_optimizers
from benchmarks.peers import NO_HVP
from benchmarks.problems import PROBLEMS
from benchmarks.resnet import HVP_GOAL, ResnetResult, evaluate_resnet_goals
from benchmarks.solvers import CG_EPS, GARBAGE, SolverResult, SolverRow, SolverSystem, evaluate_solver_goals
from benchmarks.solvers import TARGET as SOLVE_TARGET
from benchmarks.spectral import (
    TARGET,
    EigenProblem,
    SpectralResults,
    SpectralSettings,
    evaluate_spectral_goals,
)
from benchmarks.timing import percent
from curvkit.choice import AUTO_TRIALS

__all__ = [
    "LIST_SECTIONS",
    "ListSection",
    "Recorded",
    "all_goals",
    "load_recorded",
    "merge_recorded",
    "provenance_record",
    "render_ggn",
    "render_kfac",
    "render_markdown",
    "render_solvers",
    "write_results",
]

DISAGREE = 1e-4  # relative error in float32 above which a method computes another matrix
LOAD_LIMIT = 0.05
LOAD_WARNING = (
    " **Other processes competed for the cores**: absolute times are slower and noisier than on an "
    "idle machine; ratios within a table much less so, since its methods are timed interleaved."
)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


READING = [
    "Reading the tables:",
    "",
    "- curvkit's default product, *raw double backward, graph reused* and *PyHessian single batch* "
    "run the same backward pass through a kept gradient graph; differences between them are "
    "per-product overhead and timing noise.",
    "- On this shared 2-core machine, ratios move by about 5-10% between runs even when no other "
    "process is measured: judge a goal near its threshold over several runs.",
    "- With K separate products through a kept graph, `matmat` can only win by doing the K backward "
    "passes as one vectorised pass (`batched-reverse`); where that is slower, `auto` uses the "
    "looped backward and matmat costs what K matvecs cost.",
]


def _error(x: float | None) -> str:
    if x is None:
        return "-"
    return f"**{x:.1e} (disagrees)**" if x > DISAGREE else f"{x:.1e}"


def _named(row: Any) -> str:
    """A row's method, with why it was skipped where it was."""
    return row.method + (f" (skipped: {row.skipped})" if row.skipped else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _hvp_table(res: ProblemResult) -> list[str]:
    rows = [
        [
            f"{r.method}" + (f" (skipped: {r.skipped})" if r.skipped else ""),
            _num(r.median_ms, ".2f"),
            _num(r.ratio_to_gradient, ".2f"),
            _num(r.ratio_to_fastest_raw, ".2f"),
            _error(r.rel_error_vs_curvkit),
        ]
        for r in res.hvp
    ]
    header = ["method", "median ms", "/ gradient", "/ fastest raw torch", "rel. error vs curvkit"]
    return _table(
        header, [["gradient (loss + backward)", _num(res.gradient_ms, ".2f"), "1.00", "", ""]] + rows
    )


def _matmat_table(res: ProblemResult) -> list[str]:
    rows = [
        [
            _named(r),
            _num(r.median_ms, ".1f"),
            _num(r.per_vector_ms, ".2f"),
            "-" if r.speedup_vs_loop is None else f"{r.speedup_vs_loop:.2f}x",
            _error(r.rel_error_vs_curvkit),
        ]
        for r in res.matmat
    ]
    header = [
        "method",
        f"median ms (K={K})",
        "ms per vector",
        f"speed-up vs {K} x `H @ v`",
        "rel. error vs curvkit",
    ]
    return _table(header, rows)


def _goals_table(goals: Sequence[Goal]) -> list[str]:
    mark = {True: "met", False: "**not met**", None: "not measured"}
    return _table(
        ["goal", "problem", "result", "measured"], [[g.goal, g.problem, mark[g.met], g.detail] for g in goals]
    )


def _notes(res_list: Sequence[ProblemResult]) -> list[str]:
    seen: dict[str, str] = {}
    for res in res_list:
        for r in res.hvp:
            seen.setdefault(r.method, r.note)
        for r in res.matmat:
            seen.setdefault(r.method, r.note)
    return [f"- **{name}**: {note}" for name, note in seen.items() if note]


def _run_meta(meta: dict[str, Any], provenance: dict[str, list[dict]] | None, section: str) -> dict[str, Any]:
    """The settings of the run that recorded ``section`` (the latest, if several; else this run's)."""
    records = (provenance or {}).get(section) or []
    return (records[-1].get("meta") or meta) if records else meta


def _this_run(record: dict[str, Any], meta: dict[str, Any]) -> bool:
    return record.get("date") == meta["machine"]["date"] and record.get("command") == meta["command"]


def _mixed(meta: dict[str, Any], provenance: dict[str, list[dict]] | None) -> bool:
    """Whether the report holds sections (or problems) recorded by an earlier run."""
    return any(not _this_run(r, meta) for records in (provenance or {}).values() for r in records)


def _record_text(record: dict[str, Any]) -> str:
    commit = record.get("commit") or "unknown commit"
    quick = " (`--quick`)" if record.get("quick") else ""
    return f"commit {commit} on {record.get('date', 'unknown date')} by `{record.get('command', '?')}`{quick}"


def _recorded_line(section: str, meta: dict[str, Any], provenance: dict[str, list[dict]] | None) -> list[str]:
    """Under a section's heading, where its figures come from, when the report mixes runs."""
    if not _mixed(meta, provenance):
        return []
    records = (provenance or {}).get(section) or []
    parts = [f"{', '.join(r.get('problems') or []) or 'all'} recorded at {_record_text(r)}" for r in records]
    return [f"*{section}*: " + "; ".join(parts) + ".", ""] if parts else []


def _machine(record: dict[str, Any]) -> str:
    m = (record.get("meta") or {}).get("machine") or {}
    return f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')}"


def _provenance_table(meta: dict[str, Any], provenance: dict[str, list[dict]] | None) -> list[str]:
    rows = [
        [
            section,
            ", ".join(r.get("problems") or []),
            r.get("commit") or "-",
            r.get("date", "-"),
            f"`{r.get('command', '?')}`",
            "yes" if r.get("quick") else "no",
            _machine(r),
            "this run" if _this_run(r, meta) else "kept",
        ]
        for section, records in (provenance or {}).items()
        for r in records
    ]
    return _table(["section", "problems", "commit", "date", "command", "quick", "machine", ""], rows)


def render_markdown(
    meta: dict[str, Any],
    results: Sequence[ProblemResult],
    goals: Sequence[Goal],
    spectral: SpectralResults | None = None,
    lists: dict[str, Sequence[Any]] | None = None,
    provenance: dict[str, list[dict]] | None = None,
) -> str:
    """The report as Markdown.

    ``lists`` holds the results of each of :data:`LIST_SECTIONS`, by name.
    ``provenance`` (section -> records of the runs that measured it, see
    :func:`provenance_record`) adds a provenance table and a line under each
    section when the report holds figures of more than one run; the HVP timing
    settings are those of the run that recorded the HVP rows.
    """
    lists = lists or {}
    m = meta["machine"]
    timing = _run_meta(meta, provenance, "hvp" if any(r.hvp for r in results) else "matmat")
    out = [
        "# curvkit benchmarks: Hessian-vector products and spectral analysis",
        "",
        f"Generated {m['date']} by `{meta['command']}` (run from the repository root)"
        + (f" at commit {meta['commit']}." if meta.get("commit") else "."),
        "",
    ]
    if _mixed(meta, provenance):
        out += [
            f"This run measured {', '.join(meta.get('sections') or [])}; the other sections and problems are "
            "the figures recorded by earlier runs, kept from `results.json` (goals evaluated again over "
            "all of them). Machine, load and wall time below are this run's; the HVP timing settings are "
            "those of the run that recorded the HVP rows; each section says which run recorded it.",
            "",
            "Provenance:",
            "",
        ]
        out += _provenance_table(meta, provenance) + [""]
    out += [
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['platform']}; load average (1 min) "
        f"at start {m['load_average_1min']}, at end {meta['load_average_end']}.",
        f"- Python {m['python']}, torch {m['torch']}, torch threads {m['torch_threads']} "
        f"(inter-op {m['torch_interop_threads']}), OPENBLAS_NUM_THREADS={m['openblas_num_threads']}.",
    ]
    if results:
        out += [
            f"- HVP and matmat timing: median of {timing['repeats']} rounds ({timing['matmat_repeats']} for "
            f"matmat) after {timing['warmup']} warm-up round(s) "
            f"({timing.get('matmat_warmup', timing['warmup'])} for matmat, past curvkit's auto-strategy "
            "trials), all methods of a table interleaved in each round (rotating order), in one process; a "
            "fresh random vector every round. Each method's first product (on the check vector) is untimed, "
            "so kept graphs and caches are warm."
        ]
    out += [
        "- Function: the full-data mean cross-entropy, model in eval mode, float32"
        + (" (the solver section: float64)" if lists.get("solvers") else "")
        + ". Peers get the "
        "whole data set as one batch with `nn.CrossEntropyLoss()` (mean), so their normalisation "
        "matches; agreement with curvkit is checked per method (relative 2-norm error on a fixed vector; "
        f"above {DISAGREE:g} a row is marked as disagreeing: float32 rounding alone stays near 1e-7).",
        f"- Wall time of the run: {meta['wall_s']:.0f} s. CPU used by other processes during the run: "
        f"{percent(meta['other_load'])} of the machine (per problem below)."
        + (LOAD_WARNING if (meta["other_load"] or 0) > LOAD_LIMIT else ""),
        "",
        "Peers: "
        + ", ".join(f"{k} {v}" for k, v in meta["peers"].items())
        + "."
        + (
            " Their back-ends: " + ", ".join(f"{k} {v}" for k, v in meta["peer_backends"].items()) + "."
            if meta.get("peer_backends")
            else ""
        ),
        "",
    ]
    out += [f"- {k}: {v}." for k, v in NO_HVP.items()] + [""]
    if goals:
        out += ["## Goals", ""] + _goals_table(goals) + [""] + (READING + [""] if results else [])
    if results:
        out += _recorded_line("hvp", meta, provenance) + _recorded_line("matmat", meta, provenance)
    for res in results:
        out += [
            f"## {res.name}: {res.description}",
            "",
            f"P = {res.params:,} parameters, {res.samples} samples; CPU used by other processes "
            f"meanwhile: {percent(res.other_load)}.",
            "",
        ]
        if res.hvp:
            out += ["HVP (one product `H @ v`):", ""] + _hvp_table(res) + [""]
        if res.matmat:
            out += [f"matmat (K = {K} vectors):", ""] + _matmat_table(res) + [""]
    for section in SECTION_ORDER:  # hvp and matmat above; the spectral sections as one
        if section in LIST_BY_NAME and lists.get(section):
            out += _recorded_line(section, meta, provenance) + LIST_BY_NAME[section].render(
                lists[section], meta
            )
        elif section == "eigen" and spectral is not None:
            lines = []
            for part in SPECTRAL_SETTING_OF:
                if getattr(spectral, part):
                    lines += _recorded_line(part, meta, provenance)
            out += lines + render_spectral(spectral)
    if results:
        out += ["## How each method is called", ""] + _notes(results) + [""]
    return "\n".join(out)


def write_results(
    directory: Path,
    meta: dict[str, Any],
    results: Sequence[ProblemResult],
    goals: Sequence[Goal],
    spectral: SpectralResults | None = None,
    lists: dict[str, Sequence[Any]] | None = None,
    provenance: dict[str, list[dict]] | None = None,
) -> tuple[Path, Path]:
    """Write ``RESULTS.md`` and ``results.json`` into ``directory``; return their paths."""
    lists = lists or {}
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / "RESULTS.md", directory / "results.json"
    md.write_text(render_markdown(meta, results, goals, spectral, lists, provenance), encoding="utf-8")
    payload = {
        "meta": meta,
        "provenance": provenance or {},
        "goals": [asdict(g) for g in goals],
        "problems": [r.to_dict() for r in results],
        **{s.name: [r.to_dict() for r in lists.get(s.name, ())] for s in LIST_SECTIONS},
    }
    if spectral is not None:
        payload["spectral"] = spectral.to_dict()
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md, js


# ------------------------------------------------------------------ merging with the recorded results
SECTION_ORDER = (
    "hvp",
    "matmat",
    "ggn",
    "kfac",
    "eigen",
    "trace",
    "density",
    "solvers",
    "newton",
    "optimizers",
    "distributed",
    "resnet",
)
PROBLEM_ORDER = ("mlp-trained", *PROBLEMS)
SPECTRAL_SETTING_OF = {
    "eigen": ("eigen_rounds", "cross_check"),
    "trace": ("trace_seeds",),
    "density": ("density_rounds",),
}
"""The spectral settings each spectral section ran with."""


@dataclass(frozen=True)
class ListSection:
    """A section recorded as one result per problem: how it is read back, rendered and judged.

    The table behind :class:`Recorded`, ``results.json``, merging and the report
    for every such section; the HVP and matmat rows (one record per problem for
    both) and the spectral sections (three lists and their settings) have shapes
    of their own.

    Attributes:
        name: The section (``--only`` name, ``results.json`` key).
        record: The dataclass of one problem's result (read back by :func:`_build`).
        render: ``render(results, meta)``: the section's Markdown lines.
        goals: ``goals(results)``: the section's goals.
    """

    name: str
    record: type
    render: Callable[[Sequence[Any], dict[str, Any]], list[str]]
    goals: Callable[[Sequence[Any]], list[Goal]] = lambda results: []


@dataclass
class Recorded:
    """Everything a ``results.json`` holds, as result objects, with the provenance of each section.

    Attributes:
        results: The HVP and matmat rows, one record per problem.
        spectral: The eigen, trace and density sections.
        lists: The results of each of :data:`LIST_SECTIONS`, by name.
        provenance: Per section, the runs that recorded it (:func:`provenance_record`).
    """

    results: list[ProblemResult] = field(default_factory=list)
    spectral: SpectralResults | None = None
    lists: dict[str, list[Any]] = field(default_factory=dict)
    provenance: dict[str, list[dict]] = field(default_factory=dict)

    def covered(self, section: str) -> list[str]:
        """The problems holding figures of ``section``."""
        if section == "hvp":
            return [r.name for r in self.results if r.hvp]
        if section == "matmat":
            return [r.name for r in self.results if r.matmat]
        if section in SPECTRAL_SETTING_OF:
            return [r.name for r in getattr(self.spectral, section)] if self.spectral else []
        return [r.name for r in self.lists.get(section, [])]


def all_goals(rec: Recorded) -> list[Goal]:
    """Every section's goals over the (merged) results, in :data:`SECTION_ORDER`."""
    goals = evaluate_goals(rec.results)  # the hvp and matmat goals
    for section in SECTION_ORDER:
        if section in LIST_BY_NAME:
            goals += LIST_BY_NAME[section].goals(rec.lists.get(section, []))
        elif section == "eigen" and rec.spectral is not None:
            goals += evaluate_spectral_goals(rec.spectral)
    return goals


def _build(tp: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as an instance of the annotation ``tp`` (dataclasses, lists, optionals)."""
    if value is None:
        return None
    if isinstance(tp, type) and is_dataclass(tp):
        hints = get_type_hints(tp)
        known = {f.name for f in fields(tp) if f.init}
        return tp(**{k: _build(hints[k], v) for k, v in value.items() if k in known})
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        return [_build(item, v) for v in value]
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return _build(options[0], value) if len(options) == 1 else value
    return value


def provenance_record(meta: dict[str, Any], problems: Sequence[str]) -> dict[str, Any]:
    """Who recorded a section's figures on ``problems``: commit, date, command, and that run's meta."""
    return {
        "problems": list(problems),
        "commit": meta.get("commit"),
        "date": meta.get("machine", {}).get("date"),
        "command": meta.get("command"),
        "quick": meta.get("quick"),
        "meta": {k: v for k, v in meta.items() if k != "sections"},
    }


def load_recorded(path: Path) -> Recorded | None:
    """The results recorded in ``path`` (``results.json``), or ``None`` when it is missing.

    A file written before provenance was recorded gets it from its ``meta``:
    every section it lists, on the problems it holds, recorded by that run. A
    section that cannot be read back is dropped with a note on stderr.
    """
    if not path.exists():
        return None
    payload = json.loads(path.read_text(encoding="utf-8"))
    rec = Recorded()

    def read(key: str, tp: Any) -> Any:
        try:
            return _build(tp, payload.get(key))
        except Exception as exc:  # schema drift: keep the rest
            print(f"[merge] could not read the recorded {key!r} ({exc}); dropped", file=sys.stderr)
            return None

    rec.results = read("problems", list[ProblemResult]) or []
    rec.spectral = read("spectral", SpectralResults)
    for section in LIST_SECTIONS:
        value = read(section.name, list[section.record])  # type: ignore[name-defined]
        if value is not None:
            rec.lists[section.name] = value
    provenance = payload.get("provenance")
    if not provenance:
        meta = payload.get("meta") or {}
        provenance = {
            s: [provenance_record(meta, rec.covered(s))]
            for s in meta.get("sections") or SECTION_ORDER
            if rec.covered(s)
        }
    rec.provenance = {s: list(records) for s, records in provenance.items()}
    return rec


def _order(name: str) -> tuple[int, str]:
    return (PROBLEM_ORDER.index(name) if name in PROBLEM_ORDER else len(PROBLEM_ORDER), name)


def _merge_list(old: Sequence[Any], new: Sequence[Any], replaced: Sequence[str]) -> list[Any]:
    """``old`` entries of problems not ``replaced``, and ``new`` entries, in problem order."""
    by_name = {r.name: r for r in old if r.name not in replaced}
    by_name |= {r.name: r for r in new}
    return [by_name[n] for n in sorted(by_name, key=_order)]


def merge_recorded(
    old: Recorded | None, new: Recorded, sections: Sequence[str], meta: dict[str, Any]
) -> Recorded:
    """``new`` (this run: the ``sections`` it measured) over ``old`` (the recorded results).

    An entry (section, problem) this run measured replaces the recorded one;
    every other recorded entry is kept with its provenance. HVP and matmat rows
    share a per-problem record: the run's rows replace only those of the
    sections it ran (with the gradient time for ``hvp``).
    """
    old = old or Recorded()
    ran = {s: new.covered(s) for s in sections}
    merged = Recorded()
    provenance: dict[str, list[dict]] = {}
    for section in SECTION_ORDER:
        kept = []
        for record in old.provenance.get(section, []):
            problems = [p for p in record.get("problems") or [] if p not in ran.get(section, [])]
            if section not in ran or problems:
                kept.append({**record, "problems": problems if section in ran else record.get("problems")})
        if ran.get(section):
            kept.append(provenance_record(meta, ran[section]))
        if kept:
            provenance[section] = kept
    merged.provenance = provenance

    # hvp and matmat: one ProblemResult per problem
    by_name = {r.name: r for r in old.results}
    for res in new.results:
        base = by_name.get(res.name)
        if base is None:
            by_name[res.name] = res
            continue
        if res.name in ran.get("hvp", []):
            base.hvp, base.gradient_ms = res.hvp, res.gradient_ms
        if res.name in ran.get("matmat", []):
            base.matmat = res.matmat
        base.description, base.params, base.samples = res.description, res.params, res.samples
        base.other_load = res.other_load
    merged.results = [by_name[n] for n in sorted(by_name, key=_order)]
    for section in LIST_SECTIONS:
        name = section.name
        merged.lists[name] = _merge_list(old.lists.get(name, []), new.lists.get(name, []), ran.get(name, []))

    # spectral: three lists and the settings each ran with
    if old.spectral is None and new.spectral is None:
        return merged
    settings = {}
    parts = {}
    for section, names in SPECTRAL_SETTING_OF.items():
        source = new.spectral if section in ran and new.spectral is not None else old.spectral
        source = source or new.spectral
        for name in names:
            settings[name] = getattr(source.settings, name)
        old_part = getattr(old.spectral, section) if old.spectral else []
        new_part = getattr(new.spectral, section) if new.spectral else []
        parts[section] = _merge_list(old_part, new_part, ran.get(section, []))
    merged.spectral = SpectralResults(SpectralSettings(**settings), **parts)
    return merged


# ------------------------------------------------------------------ spectral sections
SPECTRAL_READING = [
    "Reading the spectral tables:",
    "",
    "- Every solve, estimate or density is timed whole, after its library's set-up (operator built, "
    "gradient graph kept where the library keeps one, one warm product), methods interleaved round by "
    "round. *HVPs* are Hessian-vector products counted at the operator (columns multiplied), not the "
    "libraries' own reports; *ms per HVP* is the solve's time divided by them, so it includes each "
    "solver's own linear algebra.",
    "- curvkit's `auto` product strategy alternates looped and batched backward passes over its first "
    f"{2 * AUTO_TRIALS} products with a new column count, timing them (real products, counted as HVPs), "
    "then keeps the faster: *first* columns show the cost of the slower trials, medians exclude it.",
]


def _short(message: str) -> str:
    """The first sentence of an error message."""
    return message.split(". ")[0]


def _mark(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def _eigen_section(spectral: SpectralResults) -> list[str]:
    st = spectral.settings
    out = [
        "## Top-5 Hessian eigenvalues",
        "",
        f"Target: the 5 largest eigenvalues to {TARGET:g} relative accuracy. Median of {st.eigen_rounds} "
        "round(s) (slow rows marked so: fewer), each method started from the same seed every "
        "round. *Error*: the largest relative "
        "difference between the returned values, sorted in descending order, and the reference. "
        "*/ curvkit*: time divided by curvkit's at tol 1e-4 (above 1: curvkit is faster). The goals "
        "compare each library's fastest setting that reached the target.",
        "",
    ]
    for res in spectral.eigen:
        out += _eigen_problem(res, st.eigen_rounds)
    return out


def _eigen_problem(res: EigenProblem, rounds: int) -> list[str]:
    """One problem's top-5 rows: its heading, reference and table (timed over ``rounds`` rounds)."""
    cross = (
        f"; curvkit at tol 1e-6 from another start vector agrees to {res.reference_cross_check:.1e}, "
        f"certified residual / |lambda_max| <= {res.check_rel_residual:.1e}"
        if res.reference_cross_check is not None
        else " (not cross-checked in this run)"
    )
    ref = ", ".join(f"{v:.6g}" for v in res.reference)
    out = [
        f"### {res.name}: {res.description}",
        "",
        f"P = {res.params:,}; CPU used by other processes meanwhile: {percent(res.other_load)}. "
        f"Reference: {ref} (ARPACK `eigsh(H.to_scipy(), k=5, which='LA', tol=1e-10)` on curvkit's "
        f"float32 operator, {res.reference_matvecs} HVPs{cross}).",
        "",
    ]
    rows = []
    for r in res.rows:
        notes = []
        if r.rounds is not None and r.rounds < rounds:
            notes.append(f"timed in {r.rounds} round")
        if r.order and r.order != "descending":
            notes.append(f"returned {r.order}")
        if r.negative:
            notes.append("negative values")
        if r.converged is False:
            notes.append("not converged")
        if r.max_rel_residual is not None:
            notes.append(f"certified: residual / |lambda_max| <= {r.max_rel_residual:.1e}")
        if r.reported_matvecs is not None and r.reported_matvecs != r.matvecs:
            notes.append(f"reports {r.reported_matvecs} HVPs")
        reached = r.rel_error is not None and r.rel_error <= TARGET
        rows.append(
            [
                _named(r),
                r.settings,
                _num(r.median_s, ".2f"),
                _num(r.first_s, ".2f"),
                _num(r.matvecs, "d"),
                "-" if not r.matvecs or r.median_s is None else f"{1e3 * r.median_s / r.matvecs:.1f}",
                _num(r.time_ratio, ".2f"),
                "-" if r.rel_error is None else f"{r.rel_error:.1e}",
                "-" if r.rel_error is None else _mark(reached),
                "; ".join(notes),
            ]
        )
    header = [
        "method",
        "settings",
        "median s",
        "first s",
        "HVPs",
        "ms per HVP",
        "/ curvkit",
        "error",
        f"<= {TARGET:g}",
        "notes",
    ]
    out += _table(header, rows) + [""]
    return out


def _trace_section(spectral: SpectralResults) -> list[str]:
    out = [
        "## Trace at an equal budget",
        "",
        f"Every estimator with a budget of 99 Hessian-vector products (curvlinops' XTrace needs an even "
        f"count: 98), seeds 0..{spectral.settings.trace_seeds - 1}. *Error*: mean over the seeds of "
        "|estimate - exact| / |exact|, +- its standard error over the seeds; with this few seeds, "
        "differences within two standard errors are not significant. */ Hutchinson*: error divided by "
        "curvkit Hutchinson's. The trace rows use the full 784-128-64-10 MLP (no smaller model was "
        "needed): the exact trace comes from BackPACK's exact Hessian diagonal, checked against curvkit's "
        "exact trace of the last layer's block from basis vectors.",
        "",
    ]
    for res in spectral.trace:
        out += [f"### {res.name}: {res.description}", ""]
        if res.skipped:
            out += [f"Skipped: {res.skipped}.", ""]
            continue
        out += [
            f"P = {res.params:,}; exact trace {res.exact_trace:.6g} ({res.reference}); check on block "
            f"`{res.check_block}`: BackPACK {res.check_backpack:.6g}, curvkit `trace(H.restrict("
            f"'{res.check_block}'), method='exact')` {res.check_curvkit_exact:.6g}, relative difference "
            f"{res.check_rel_diff:.1e}. ||H||_F^2 = {res.frobenius_sq:.4g} (64 Gaussian probes), "
            f"sum of H_ii^2 = {res.diagonal_sq:.3g}: Hutchinson with 99 Rademacher probes should have a mean "
            f"relative error near {res.expected_hutchinson_error:.2e} (sqrt(2/pi) x its standard deviation "
            f"sqrt(2 (||H||_F^2 - sum H_ii^2) / 99) / |tr H|). CPU used by other processes meanwhile: "
            f"{percent(res.other_load)}.",
            "",
        ]
        rows = [
            [
                _named(r),
                r.settings,
                _num(r.matvecs, "d"),
                "-"
                if r.mean_rel_error is None
                else f"{r.mean_rel_error:.2e}"
                + (f" +- {r.stderr_rel_error:.1e}" if r.stderr_rel_error else ""),
                _num(r.max_rel_error, ".2e"),
                _num(r.error_ratio, ".2f"),
                _num(r.median_ms, ".0f"),
                _num(r.first_ms, ".0f"),
            ]
            for r in res.rows
        ]
        header = [
            "method",
            "settings",
            "HVPs",
            "mean rel. error",
            "max rel. error",
            "/ Hutchinson",
            "median ms",
            "first ms",
        ]
        out += _table(header, rows) + [""]
    return out


def _density_section(spectral: SpectralResults) -> list[str]:
    out = [
        "## Spectral density (stochastic Lanczos quadrature)",
        "",
        f"At PyHessian's defaults, `density(iter=100, n_v=1)`: 100 Lanczos steps, 1 run (curvkit also with "
        f"its default 5 runs). {spectral.settings.density_rounds} round(s). */ curvkit*: time divided by "
        "curvkit's with 1 run. *Largest node*: the largest quadrature node (Ritz value), which should "
        "match the largest eigenvalue; its relative difference from the top-5 reference is shown where "
        "that section ran. A library that raised is timed up to the exception.",
        "",
    ]
    for res in spectral.density:
        lam = "" if res.largest_eigenvalue is None else f"; largest eigenvalue {res.largest_eigenvalue:.6g}"
        out += [
            f"### {res.name}: {res.description}",
            "",
            f"P = {res.params:,}{lam}. CPU used by other processes meanwhile: {percent(res.other_load)}.",
            "",
        ]
        rows = []
        for r in res.rows:
            node = "-"
            if r.top_node is not None:
                node = f"{r.top_node:.6g}" + (
                    f" ({r.top_node_rel_error:.1e})" if r.top_node_rel_error is not None else ""
                )
            outcome = (
                f"**raised** {_short(r.error)}" if r.error else ("ok" if r.median_s is not None else "-")
            )
            rows.append(
                [
                    _named(r),
                    r.settings,
                    _num(r.median_s, ".2f"),
                    _num(r.matvecs, "d"),
                    _num(r.time_ratio, ".2f"),
                    node,
                    outcome,
                ]
            )
        header = ["method", "settings", "s", "HVPs", "/ curvkit", "largest node (rel. diff.)", "outcome"]
        out += _table(header, rows) + [""]
    return out


def _spectral_notes(spectral: SpectralResults) -> list[str]:
    seen: dict[str, str] = {}
    for section in (spectral.eigen, spectral.trace, spectral.density):
        for res in section:
            for r in res.rows:
                seen.setdefault(r.method, r.note)
    return [f"- **{name}**: {note}" for name, note in seen.items() if note]


def render_spectral(spectral: SpectralResults) -> list[str]:
    """The spectral sections (top-5 eigenvalues, traces, densities) as Markdown lines."""
    out: list[str] = []
    if not (spectral.eigen or spectral.trace or spectral.density):
        return out
    out += SPECTRAL_READING + [""]
    if spectral.eigen:
        out += _eigen_section(spectral)
    if spectral.trace:
        out += _trace_section(spectral)
    if spectral.density:
        out += _density_section(spectral)
    out += ["## How each spectral method is called", ""] + _spectral_notes(spectral) + [""]
    return out


def _timed_header(res: Any, kind: str) -> list[str]:
    """The heading and size line of a problem's section in the GGN and KFAC tables."""
    return [
        f"## {kind} on {res.name}: {res.description}",
        "",
        f"P = {res.params:,} parameters, {res.samples} samples; "
        f"gradient {_num(res.gradient_ms, '.2f')} ms; "
        f"CPU used by other processes meanwhile: {percent(res.other_load)}.",
        "",
    ]


def _method_notes(rows: Any, kind: str) -> list[str]:
    """``## How each <kind> method is called``: every method's note, once."""
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r.method, r.note)
    return (
        [f"## How each {kind} method is called", ""]
        + [f"- **{name}**: {note}" for name, note in seen.items() if note]
        + [""]
    )


# ------------------------------------------------------------------ Gauss-Newton and Fisher
GGN_READING = [
    "Reading the Gauss-Newton and Fisher tables:",
    "",
    "- */ gradient*: median time over one full-data loss and gradient timed in the same rounds. "
    "*/ fastest peer*: over the fastest peer row of the same quantity (the exact Fisher of the "
    "cross-entropy is its GGN, so it is set against the GGN peers). Rows marked *(context)* pin a "
    "strategy or loop over separate products; the goals hold the default rows to account.",
    "- *float32 vs curvkit*: relative 2-norm difference on the check vector from curvkit's default row "
    f"of the same quantity. *float64*: the same on a float64 copy of the problem; definitions coincide "
    f"to rounding where it is below {AGREEMENT:g}. Monte-Carlo rows draw independent targets and are "
    "not compared.",
    "- curvkit's `auto` strategy times its ways (forward-mode `torch.func`, plain-autograd double-vjp, "
    "and for the empirical Fisher per-sample gradients) on its first products per column count "
    "and keeps the fastest; the warm-up rounds cover those trials.",
]


def _ggn_table(rows: Sequence[GGNRow], first: str, matmat: bool = False) -> list[str]:
    body = []
    for r in rows:
        name = r.method + ("" if r.headline else " (context)")
        name += f" (skipped: {r.skipped})" if r.skipped else ""
        second = (
            ("-" if r.speedup_vs_loop is None else f"{r.speedup_vs_loop:.2f}x")
            if matmat
            else _num(r.ratio_to_gradient, ".2f")
        )
        body.append(
            [
                name,
                r.quantity,
                _num(r.median_ms, ".2f"),
                "-" if r.median_ms is None else f"{r.min_ms:.2f}-{r.max_ms:.2f}",
                second,
                _num(r.ratio_to_fastest_peer, ".2f"),
                _error(r.rel_error_vs_curvkit),
                "-" if r.float64_agreement is None else f"{r.float64_agreement:.1e}",
            ]
        )
    header = [
        "method",
        "quantity",
        first,
        "fastest-slowest",
        f"speed-up vs {K} separate" if matmat else "/ gradient",
        "/ fastest peer",
        "float32 vs curvkit",
        "float64 vs curvkit",
    ]
    return _table(header, body)


def render_ggn(results: Sequence[GGNResult], meta: dict[str, Any]) -> list[str]:
    """The Gauss-Newton and Fisher sections as Markdown lines."""
    out = GGN_READING + [""]
    for res in results:
        out += _timed_header(res, "GGN and Fisher") + ["One product:", ""]
        out += _ggn_table(res.matvec, "median ms") + ["", f"K = {K} directions:", ""]
        out += _ggn_table(res.matmat, f"median ms (K={K})", matmat=True) + ["", "Diagonals:", ""]
        out += _ggn_table(res.diagonal, "median ms") + [""]
    rows = [r for res in results for r in (*res.matvec, *res.matmat, *res.diagonal)]
    return out + _method_notes(rows, "GGN and Fisher")


# ------------------------------------------------------------------ KFAC
KFAC_READING = [
    "Reading the KFAC tables:",
    "",
    "- *Factors*: each call builds the operator, computes its factors over the data and applies it "
    "once (curvkit and curvlinops), or runs BackPACK's backward pass with the extension (factors "
    "only, no product). EKFAC rows include their second pass. */ fastest peer*: over the fastest peer "
    "row of the same quantity.",
    f"- *Inverse*: one product `(K + {DAMPING:g} I)^-1 v` with the inverse prepared beforehand (untimed).",
    "- *float64 vs curvkit*: relative difference of the products `K v` (or inverse products) on a "
    "float64 copy: they do not depend on how a library splits a scale between the two factors, so "
    "they agree wherever the definitions do. Monte-Carlo rows draw independent targets.",
]


def _kfac_table(rows: Sequence[GGNRow]) -> list[str]:
    body = [
        [
            _named(r),
            r.quantity,
            _num(r.median_ms, ".2f"),
            "-" if r.median_ms is None else f"{r.min_ms:.2f}-{r.max_ms:.2f}",
            _num(r.ratio_to_gradient, ".2f"),
            _num(r.ratio_to_fastest_peer, ".2f"),
            "-" if r.float64_agreement is None else f"{r.float64_agreement:.1e}",
        ]
        for r in rows
    ]
    header = ["method", "quantity", "median ms", "fastest-slowest", "/ gradient", "/ fastest peer", "float64"]
    return _table(header, body)


def render_kfac(results: Sequence[KFACResult]) -> list[str]:
    """The KFAC sections as Markdown lines."""
    out = KFAC_READING + [""]
    for res in results:
        out += _timed_header(res, "KFAC") + ["Factors:", ""]
        out += _kfac_table(res.factors) + ["", "Inverse products:", ""] + _kfac_table(res.inverse) + [""]
    rows = [r for res in results for r in (*res.factors, *res.inverse)]
    return out + _method_notes(rows, "KFAC")


# ------------------------------------------------------------------ linear solvers
SOLVER_READING = [
    "Reading the solver tables:",
    "",
    f"- *Products*: products with the curvature operator (columns multiplied), counted at the operator, "
    f"not the libraries' own reports (curvkit's `SolveResult.matvecs` agrees with its counter; curvkit "
    f"`neumann` includes its largest-eigenvalue estimate, GPyTorch's CG its product with the zero "
    f"initial guess). *True residual*: `||g - (A + d I) x|| / ||g||` of the returned answer, measured "
    f"afterwards in float64 with one more product (not counted); *reached* means it is at most "
    f"{SOLVE_TARGET:g}. curvkit's claim is its recurrence's residual.",
    "- *s*: the whole solve, median over the rounds shown (rows that reached the target are timed over "
    "more rounds, interleaved; the others once: their time is the time to their cap). *ms per product* "
    "divides it by the products, so it includes each solver's own linear algebra and each library's "
    "product cost (curvkit and curvlinops products are not equally fast).",
    f"- *Garbage*: an answer more than {GARBAGE:g} (relative 2-norm) from the reference. *Flagged*: "
    "curvkit said `converged=False`, or the peer raised or warned; *silent*: it returned as if "
    "nothing were wrong.",
    "- Goals: for each curvlinops solver (default settings, not the context row), the fewest products "
    "any curvkit solver needs to reach the accuracy that peer returned (its true residual, or the "
    f"{SOLVE_TARGET:g} target if it did better), from curvkit's per-iteration history (confirmed by "
    "its answer's true residual), against the products the peer spent.",
]


def _verdict(row: SolverRow) -> str:
    if row.skipped:
        return "-"
    if row.residual is None:
        return "raised: no answer"
    flag = "flagged" if row.flagged else "silent"
    if row.rel_error is not None and not row.rel_error <= GARBAGE:
        return f"**garbage, {flag}**" if not row.flagged else f"garbage, {flag}"
    if row.reached:
        return "ok"
    return f"short of {SOLVE_TARGET:g}, {flag}"


def _solver_cells(r: SolverRow) -> list[str]:
    per = "-" if not r.matvecs or r.median_s is None else f"{1e3 * r.median_s / r.matvecs:.1f}"
    spread = "-" if r.median_s is None else f"{r.min_s:.2f}-{r.max_s:.2f} ({r.rounds})"
    return [_num(r.median_s, ".2f"), spread, per]


def _solver_row_name(r: SolverRow) -> str:
    """The method, marked as context or skipped."""
    return r.method + ("" if r.headline else " (context)") + (f" (skipped: {r.skipped})" if r.skipped else "")


def _psd_table(system: SolverSystem) -> list[str]:
    rows = []
    for r in system.rows:
        name = _solver_row_name(r)
        rows.append(
            [
                name,
                r.settings,
                _num(r.matvecs, "d"),
                "-" if r.residual is None else ("yes" if r.reached else "**no**"),
                _num(r.residual, ".1e"),
                _num(r.claimed_residual, ".1e"),
                *_solver_cells(r),
                r.says,
            ]
        )
    header = [
        "method",
        "settings",
        "products",
        f"reached {SOLVE_TARGET:g}",
        "true residual",
        "claimed",
        "median s",
        "fastest-slowest (rounds)",
        "ms per product",
        "says",
    ]
    return _table(header, rows)


def _indefinite_table(system: SolverSystem) -> list[str]:
    rows = []
    for r in system.rows:
        name = _solver_row_name(r)
        rows.append(
            [
                name,
                r.settings,
                _num(r.matvecs, "d"),
                _num(r.residual, ".1e"),
                _num(r.rel_error, ".1e"),
                _num(r.cosine, ".4f"),
                _num(r.norm_ratio, ".3g"),
                _num(r.median_s, ".2f"),
                r.says,
                _verdict(r),
            ]
        )
    header = [
        "method",
        "settings",
        "products",
        "true residual",
        "rel. error vs reference",
        "cosine",
        "norm / reference",
        "s",
        "says",
        "verdict",
    ]
    return _table(header, rows)


def _float32_table(system: SolverSystem) -> list[str]:
    rows = [
        [
            r.method,
            r.settings,
            _num(r.matvecs, "d"),
            r.says,
            _num(r.claimed_residual, ".1e"),
            _num(r.residual, ".1e"),
            "-" if r.residual is None else ("yes" if r.reached else "**no**"),
        ]
        for r in system.rows
    ]
    header = [
        "method",
        "settings",
        "products",
        "says",
        "claimed",
        "true residual (float64)",
        f"<= {SOLVE_TARGET:g}",
    ]
    return _table(header, rows)


def render_solvers(results: Sequence[SolverResult]) -> list[str]:
    """The linear-solver sections as Markdown lines."""
    out = SOLVER_READING + [""]
    for res in results:
        out += [
            f"## Linear solvers on {res.name}: {res.description}",
            "",
            f"P = {res.params:,} parameters, {res.samples} samples, on a float64 copy of the model; "
            f"right-hand side the full-data gradient g (||g|| = {_num(res.rhs_norm, '.4g')}). CPU used by "
            f"other processes meanwhile: {percent(res.other_load)}.",
            "",
        ]
        psd, indefinite, f32 = res.system("psd"), res.system("indefinite"), res.system("float32")
        if psd is not None:
            kappa = (
                ""
                if psd.lambda_max is None
                else f"; lambda_max(GGN) = {psd.lambda_max:.4g} (curvkit `eigenvalues`, to 1%, "
                f"{psd.estimate_matvecs} products), so the condition number of G + dI is at most "
                f"(lambda_max + d) / d = {(psd.lambda_max + psd.damping) / psd.damping:,.0f}"
            )
            out += [
                f"### (GGN + {psd.damping:g} I) x = g, {psd.dtype}",
                "",
                f"Positive definite{kappa}. Cap: {psd.cap} iterations ({psd.cap // 2} for LSMR); rows that "
                f"reached {SOLVE_TARGET:g} timed over {psd.rounds} round(s), the others once.",
                "",
            ]
            out += _psd_table(psd) + [""]
        if indefinite is not None:
            spectrum = (
                ""
                if indefinite.lambda_min is None
                else f"Hessian spectrum [{indefinite.lambda_min:.4g}, {indefinite.lambda_max:.4g}] (curvkit "
                f"`eigenvalues`, both ends, to 1%, {indefinite.estimate_matvecs} products): the damped "
                f"system has eigenvalues down to {indefinite.lambda_min + indefinite.damping:.3g}, so it is "
                "indefinite. "
            )
            ref = (
                f"Reference: {indefinite.reference}: {indefinite.reference_matvecs} products, "
                f"{'converged' if indefinite.reference_converged else '**not converged**'}, true residual "
                f"{_num(indefinite.reference_residual, '.1e')}."
            )
            out += [
                f"### (Hessian + {indefinite.damping:g} I) x = g, {indefinite.dtype}: indefinite",
                "",
                spectrum + ref + f" Same solvers and settings, cap {indefinite.cap}; one round.",
                "",
            ]
            out += _indefinite_table(indefinite) + [""]
        if f32 is not None:
            out += [
                f"### Why float64: curvkit on (GGN + {f32.damping:g} I) x = g in float32",
                "",
                "The same solves on the float32 problem; the true residual of each answer is measured on "
                "the float64 system. Products rounded to float32 (about 1e-7 relative) bound how small "
                "a true residual gets, while the recurrences' residuals, which the solvers watch, go on "
                "falling: the claim overstates the answer.",
                "",
            ]
            out += _float32_table(f32) + [""]
    notes: dict[str, str] = {}
    for res in results:
        for system in res.systems:
            for r in system.rows:
                notes.setdefault(r.method, r.note)
    out += ["## How each solver is called", ""]
    out += [f"- **{name}**: {note}" for name, note in notes.items() if note]
    out += [
        f"- GPyTorch's `eps` guard: the context row sets `eps={CG_EPS:g}` to show that its CG, once the "
        "guard is out of the way, takes the same steps as curvkit's.",
        "",
    ]
    return out


# ------------------------------------------------------------------ ResNet-18 on one device
def render_resnet(results: Sequence[ResnetResult]) -> list[str]:
    """The ResNet-18 section: HVP rows against the gradient, and the top-5 rows, with the device named."""
    out = [
        "## ResNet-18 on one device",
        "",
        "`python -m benchmarks --only resnet [--device cuda]` (see `benchmarks/resnet.py`): every library "
        "on the same device, float32, one batch of all the samples, each timed call ended by a device "
        f"synchronisation. The goal: curvkit's Hessian-vector product at most {HVP_GOAL:g} gradients "
        "(curvlinops measured 2.25x compiled, 7.9x eager, on a GPU).",
        "",
    ]
    for res in results:
        out += [
            f"### {res.name}: {res.description}",
            "",
            f"Device: {res.device}. P = {res.params:,}; HVP rows: median of {res.repeats} interleaved "
            f"rounds; CPU used by other processes meanwhile: {percent(res.other_load)}.",
            "",
        ]
        out += _hvp_table(res) + [""]
        if res.eigen is not None:
            out += ["Top-5 eigenvalues (one round):", ""] + _eigen_problem(res.eigen, 1)[2:]
    return out


# ------------------------------------------------------------------ the list sections
def _without_meta(render: Callable[[Sequence[Any]], list[str]]) -> Callable[[Sequence[Any], dict], list[str]]:
    return lambda results, meta: render(results)


LIST_SECTIONS = (
    ListSection("ggn", GGNResult, render_ggn, evaluate_ggn_goals),
    ListSection("kfac", KFACResult, _without_meta(render_kfac), evaluate_kfac_goals),
    ListSection("solvers", SolverResult, _without_meta(render_solvers), evaluate_solver_goals),
    ListSection("newton", NewtonResult, _without_meta(render_newton)),
    ListSection("optimizers", OptimizersResult, _without_meta(render_optimizers), evaluate_optimizer_goals),
    ListSection(
        "distributed", DistributedResult, _without_meta(render_distributed), evaluate_distributed_goals
    ),
    ListSection("resnet", ResnetResult, _without_meta(render_resnet), evaluate_resnet_goals),
)
"""Every section recorded as a list of per-problem results, in :data:`SECTION_ORDER`."""

LIST_BY_NAME = {s.name: s for s in LIST_SECTIONS}
