"""Per-layer spectra: top eigenvalue and trace of every diagonal block.

Each block is the operator restricted to one parameter tensor (``by="parameter"``)
or to the parameters of one module (``by="module"``, grouping names by their
prefix before the last dot). Data-backed operators restrict by differentiating
only the block's parameters, so a block costs what its own products cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from curvkit.errors import CurvkitError
from curvkit.linalg._common import Progress
from curvkit.linalg.eigen import eigenvalues
from curvkit.linalg.trace import trace
from curvkit.snapshot import fixed_model_state

__all__ = ["LayerRow", "LayerTable", "layer_blocks", "per_layer"]


@dataclass(frozen=True)
class LayerRow:
    """One block: its name, parameters, dimension, top eigenvalue and trace."""

    name: str
    params: tuple[str, ...]
    dim: int
    top_eigenvalue: float
    residual: float
    converged: bool
    trace: float
    trace_stderr: float
    trace_method: str
    matvecs: int


@dataclass(frozen=True)
class LayerTable:
    """The rows of :func:`per_layer`, in parameter order."""

    rows: list[LayerRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        """Columns of plain Python values, for JSON and HDF5."""
        names = LayerRow.__dataclass_fields__
        return {
            n: [list(getattr(r, n)) if n == "params" else getattr(r, n) for r in self.rows] for n in names
        }

    def __iter__(self):  # noqa: ANN204 - iterate rows
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def layer_blocks(names: Sequence[str], by: str = "module") -> dict[str, list[str]]:
    """Group parameter names into blocks, keeping their order.

    Args:
        names: Parameter names in flattening order.
        by: ``"parameter"`` (one block per tensor) or ``"module"`` (by the prefix
            before the last dot: ``"fc1.weight"`` and ``"fc1.bias"`` form ``"fc1"``).
    """
    if by not in ("parameter", "module"):
        raise CurvkitError(f"by must be 'parameter' or 'module', got {by!r}")
    blocks: dict[str, list[str]] = {}
    for name in names:
        key = name if by == "parameter" else (name.rsplit(".", 1)[0] if "." in name else name)
        blocks.setdefault(key, []).append(name)
    return blocks


@fixed_model_state()
def per_layer(
    A: Any,
    by: str = "module",
    *,
    tol: float = 1e-4,
    trace_method: str | None = None,
    trace_matvecs: int = 99,
    exact_trace_max_dim: int = 512,
    seed: int = 0,
    progress: Progress | None = None,
) -> LayerTable:
    """Top eigenvalue and trace of every layer's diagonal block of ``A``.

    Args:
        A: A :class:`~curvkit.CurvatureOperator` with a parameter layout.
        by: ``"module"`` or ``"parameter"`` (see :func:`layer_blocks`).
        tol: Relative residual tolerance of the top eigenvalue.
        trace_method: Trace method for every block; by default ``"exact"`` for
            blocks of at most ``exact_trace_max_dim`` parameters of an exact
            operator, ``"hutch++"`` otherwise.
        trace_matvecs: Budget of the stochastic trace per block.
        exact_trace_max_dim: Largest block traced exactly by default.
        seed: Seed of the eigenvalue start vectors and trace probes.
        progress: Called with ``{"layer", "layers", "name"}`` before each block.
    """
    blocks = layer_blocks(A.layout.names, by)
    rows = []
    for i, (name, params) in enumerate(blocks.items()):
        if progress is not None:
            progress({"layer": i, "layers": len(blocks), "name": name})
        block = A.restrict(params)
        before = block.matvecs
        eig = eigenvalues(block, k=1, which="largest", tol=tol, seed=seed, return_vectors=False)
        method = trace_method or (
            "exact" if getattr(block, "EXACT", False) and block.shape[0] <= exact_trace_max_dim else "hutch++"
        )
        tr = trace(block, method=method, matvecs=trace_matvecs, seed=seed)
        rows.append(
            LayerRow(
                name=name,
                params=tuple(params),
                dim=block.shape[0],
                top_eigenvalue=eig.values[0].item(),
                residual=eig.residuals[0].item(),
                converged=eig.converged,
                trace=float(tr.estimate),
                trace_stderr=float(tr.stderr),
                trace_method=tr.method,
                matvecs=block.matvecs - before,
            )
        )
    return LayerTable(rows)
