"""``per_layer/module``: the top eigenvalue and the trace of each layer's diagonal block."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from curvkit.kinds import AnalysisContext, AnalysisKind, ResultTable, Row
from curvkit.linalg.per_layer import LayerRow, LayerTable, per_layer

__all__ = ["KIND"]

_COLUMNS = tuple(LayerRow.__dataclass_fields__)
_NUMBERS = ("dim", "top_eigenvalue", "residual", "converged", "trace", "trace_stderr", "matvecs")


def _keys(plan: Any, psd: bool, estimator: str | None) -> list[str]:
    return ["per_layer/module"] if plan.per_layer else []


def _request(plan: Any, key: str) -> dict[str, Any]:
    return {"tol": plan.tol, "seed": plan.seed}


def _compute(context: AnalysisContext, key: str) -> LayerTable:
    plan = context.plan
    return per_layer(context.op, tol=plan.tol, seed=plan.seed, progress=context.report(key))


def _write(g: Any, table: LayerTable) -> None:
    import h5py

    text = h5py.string_dtype()
    rows = table.rows
    g.create_dataset("name", data=np.array([r.name for r in rows], dtype=object), dtype=text)
    params = [json.dumps(list(r.params)) for r in rows]
    g.create_dataset("params_json", data=np.array(params, dtype=object), dtype=text)
    g.create_dataset("dim", data=np.array([r.dim for r in rows], dtype=np.int64))
    for col in ("top_eigenvalue", "residual", "trace", "trace_stderr"):
        g.create_dataset(col, data=np.array([getattr(r, col) for r in rows], dtype=np.float64))
    g.create_dataset("converged", data=np.array([r.converged for r in rows], dtype=bool))
    g.create_dataset("trace_method", data=np.array([r.trace_method for r in rows], dtype=object), dtype=text)
    g.create_dataset("matvecs", data=np.array([r.matvecs for r in rows], dtype=np.int64))
    g.attrs["rows"] = len(rows)


def _read(g: Any) -> LayerTable:
    cols = {
        "name": g["name"].asstr()[()].tolist(),
        "params": [tuple(json.loads(p)) for p in g["params_json"].asstr()[()].tolist()],
        "trace_method": g["trace_method"].asstr()[()].tolist(),
    }
    for col in _NUMBERS:
        cols[col] = np.asarray(g[col][()]).tolist()
    n = len(cols["name"])
    if any(len(v) != n for v in cols.values()):
        raise ValueError("columns of different lengths")
    return LayerTable([LayerRow(**{c: cols[c][i] for c in _COLUMNS}) for i in range(n)])


def _rows(res: LayerTable) -> Iterator[Row]:
    for row in res.rows:
        for col in _NUMBERS:
            v = getattr(row, col)
            yield col, row.name, int(v) if isinstance(v, bool) else v


def _summarize(table: LayerTable) -> str:
    rows = list(table)
    if not rows:
        return "no layers"
    top = max(rows, key=lambda r: r.top_eigenvalue)
    return f"{len(rows)} layers; largest top eigenvalue {top.top_eigenvalue:.4g} ({top.name})"


def _tables(items: Sequence[tuple[str, LayerTable]]) -> list[ResultTable]:
    columns = ("layer", "P", "top eigenvalue", "residual", "trace", "stderr")
    return [
        ResultTable(
            key,
            columns,
            [
                [
                    row.name,
                    f"{row.dim:,}",
                    f"{row.top_eigenvalue:.4g}",
                    f"{row.residual:.1e}",
                    f"{row.trace:.4g}",
                    f"{row.trace_stderr:.2g}",
                ]
                for row in table
            ],
        )
        for key, table in items
    ]


def _figures(table: LayerTable, title: str, log: bool) -> list[tuple[str, Any]]:
    from curvkit.plotting import plot_per_layer

    return [
        (quantity, plot_per_layer(table, quantity, title=title)) for quantity in ("top_eigenvalue", "trace")
    ]


KIND = AnalysisKind(
    name="per_layer",
    result_type=LayerTable,
    keys=_keys,
    request=_request,
    compute=_compute,
    write=_write,
    read=_read,
    rows=_rows,
    summarize=_summarize,
    tables=_tables,
    figures=_figures,
)
