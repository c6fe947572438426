r"""``RunningCurvature``: an estimator's curvature averaged over mini-batches, kept across training steps.

An analysis builds a curvature once, on a fixed dataset. Training sees a new
mini-batch at every step, and second-order optimizers precondition with a
running average of the per-batch curvatures ``C_t`` instead (K-FAC: J. Martens
and R. Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", ICML 2015, Section 5):

.. math::

    \bar C_1 = C_1, \qquad \bar C_t = \epsilon\, \bar C_{t-1} + (1 - \epsilon)\, C_t ,

with the decay ``epsilon`` in ``[0, 1)``. The average is kept in the
curvature's structure, one table entry per kind of operator (:data:`STRUCTURES`):

* ``"kronecker"``: a :class:`curvkit.KroneckerOperator` (the ``kfac``
  estimator). Its factors are averaged separately, ``bar A`` and ``bar B`` per
  block, as Martens and Grosse do: the running curvature is ``bar B (x) bar A``,
  not the average of the products ``B_t (x) A_t``. Blocks with eigenvalue
  corrections (EKFAC's scalings, which live in each batch's own eigenbasis) are
  refused: :class:`curvkit.optim.EKFAC` averages them in a frozen eigenbasis;
* ``"diagonal"``: a :class:`curvkit.DiagonalOperator`, its diagonal averaged;
* ``"dense"``: a :class:`curvkit.DenseOperator`, its matrix averaged.

A matrix-free operator (the Hessian's or the GGN's products) has nothing to
average and is refused in one line. A block (or the diagonal, or the matrix) that
a batch does not have, or has with another shape, starts again from that batch's.

Each :meth:`RunningCurvature.update` builds the estimator on the batch's
:class:`curvkit.Problem` (:meth:`curvkit.Problem.on_batch`): the very per-batch
products of the analyses; only the averaging is here. A batch whose curvature is
not finite is refused (:class:`curvkit.errors.NonFiniteError`) and leaves the
average as it was. :meth:`~RunningCurvature.state_dict` holds only tensors,
numbers and strings, so that ``torch.load(weights_only=True)`` reads it back.

Example:
    >>> import torch, curvkit
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> problem = curvkit.Problem(model, "cross_entropy", (torch.randn(8, 3), torch.randint(0, 2, (8,))))
    >>> running = curvkit.RunningCurvature("kfac", decay=0.9)
    >>> for _ in range(3):
    ...     X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    ...     K = running.update(problem.on_batch(X, y))
    >>> type(K).__name__, running.updates
    ('KroneckerOperator', 3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvkit.arguments import fraction
from curvkit.errors import CurvkitError, NonFiniteError
from curvkit.finite import all_finite
from curvkit.kronecker import KroneckerBlock, KroneckerOperator
from curvkit.layout import ParameterLayout
from curvkit.operator import CurvatureOperator, DenseOperator, DiagonalOperator

if TYPE_CHECKING:
    from curvkit.problem import Problem

__all__ = [
    "STRUCTURES",
    "Parts",
    "RunningCurvature",
    "Structure",
    "kronecker_key",
    "parts_finite",
    "structure_of",
]

Parts = dict[str, dict[str, Any]]
"""A curvature's averaged pieces: per piece (a Kronecker block, the diagonal,
the matrix), its tensors by name and its plain descriptors (``"meta"``)."""


@dataclass(frozen=True)
class Structure:
    """How one kind of operator is averaged: taken apart into named tensors, and built again.

    Attributes:
        name: The structure's name (``"kronecker"``, ``"diagonal"``, ``"dense"``).
        kind: The operator class it applies to.
        parts: ``operator -> Parts``: per piece, its tensors (averaged) and, under
            ``"meta"``, what identifies it (kept from the newest batch).
        build: ``(parts, layout, dtype, device) -> operator``.
    """

    name: str
    kind: type
    parts: Callable[[Any], Parts]
    build: Callable[[Parts, ParameterLayout, torch.dtype, Any], CurvatureOperator]


def _kronecker_parts(op: KroneckerOperator) -> Parts:
    names = op.layout.names
    parts: Parts = {}
    for block in op.blocks:
        if block.scalings is not None:
            raise CurvkitError(
                f"block {block.name!r} has eigenvalue corrections (EKFAC's scalings, in its batch's own "
                "eigenbasis): they cannot be averaged across batches; average the 'kfac' factors, or use "
                "curvkit.optim.EKFAC, which averages the scalings in a frozen eigenbasis"
            )
        weight = None if block.weight is None else names[block.weight]
        bias = None if block.bias is None else names[block.bias]
        meta = {"name": block.name, "weight": weight, "bias": bias}
        parts[kronecker_key(block, op.layout)] = {"A": block.A.detach(), "B": block.B.detach(), "meta": meta}
    return parts


def kronecker_key(block: KroneckerBlock, layout: ParameterLayout) -> str:
    """A Kronecker block's name in :data:`Parts`: its layer and the names of its weight and bias."""
    weight = None if block.weight is None else layout.names[block.weight]
    bias = None if block.bias is None else layout.names[block.bias]
    return f"{block.name}|{weight}|{bias}"


def _kronecker_build(
    parts: Parts, layout: ParameterLayout, dtype: torch.dtype, device: Any
) -> CurvatureOperator:
    index = {name: i for i, name in enumerate(layout.names)}
    blocks = [
        KroneckerBlock(
            weight=None if part["meta"]["weight"] is None else index[part["meta"]["weight"]],
            bias=None if part["meta"]["bias"] is None else index[part["meta"]["bias"]],
            A=part["A"],
            B=part["B"],
            name=part["meta"]["name"],
        )
        for part in parts.values()
    ]
    return KroneckerOperator(layout, blocks, dtype=dtype, device=device)


def _diagonal_build(
    parts: Parts, layout: ParameterLayout, dtype: torch.dtype, device: Any
) -> CurvatureOperator:
    return DiagonalOperator(parts["diagonal"]["values"], layout)


def _dense_build(parts: Parts, layout: ParameterLayout, dtype: torch.dtype, device: Any) -> CurvatureOperator:
    return DenseOperator(parts["dense"]["matrix"], layout, symmetric=True, psd=parts["dense"]["meta"]["psd"])


STRUCTURES: tuple[Structure, ...] = (
    Structure("kronecker", KroneckerOperator, _kronecker_parts, _kronecker_build),
    Structure(
        "diagonal",
        DiagonalOperator,
        lambda op: {"diagonal": {"values": op.values.detach(), "meta": {}}},
        _diagonal_build,
    ),
    Structure(
        "dense",
        DenseOperator,
        lambda op: {"dense": {"matrix": op.to_dense().detach(), "meta": {"psd": bool(op.PSD)}}},
        _dense_build,
    ),
)
"""The operators :class:`RunningCurvature` averages, one row each (module docstring)."""


def parts_finite(parts: Parts) -> bool:
    """Whether every tensor of ``parts`` is finite (one fused check, :func:`curvkit.finite.all_finite`)."""
    return all_finite(t for part in parts.values() for t in part.values() if isinstance(t, Tensor))


def structure_of(op: CurvatureOperator, estimator: str = "") -> Structure:
    """The :data:`STRUCTURES` row of ``op``'s class, or a one-line :class:`CurvkitError`.

    ``op`` is an operator's :meth:`~curvkit.CurvatureOperator.structured` form.
    """
    for structure in STRUCTURES:
        if isinstance(op, structure.kind):
            return structure
    names = ", ".join(f"{s.name} ({s.kind.__name__})" for s in STRUCTURES)
    of = f"estimator {estimator!r}'s " if estimator else ""
    raise CurvkitError(
        f"{of}{type(op).__name__} has no structure to average across batches (only its products); "
        f"averaged: {names}"
    )


def _moved(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``value`` on ``device``, cast to ``dtype`` if it is a floating tensor (``None``: kept)."""
    if not isinstance(value, Tensor):
        return value
    return value.to(device, dtype if dtype is not None and value.is_floating_point() else None)


class RunningCurvature:
    """An estimator's curvature as a running average over mini-batches (module docstring).

    Args:
        estimator: A registered estimator whose operator has a structure of
            :data:`STRUCTURES` (``"kfac"``, or a plugin's).
        decay: ``epsilon`` in ``[0, 1)`` (0: the newest batch's curvature alone).
        **options: The estimator's options, for every update.

    Attributes:
        updates: Batches folded in so far.

    Raises:
        ValueError: A decay outside ``[0, 1)``.
    """

    def __init__(self, estimator: str, decay: float = 0.95, **options: Any) -> None:
        self.decay = fraction(decay, "decay", below_one=True, error=ValueError)
        self.estimator = estimator
        self.options = dict(options)
        self.updates = 0
        self._structure: Structure | None = None
        self._layout: ParameterLayout | None = None
        self._dtype: torch.dtype | None = None
        self._device: Any = None
        self._average: Parts = {}

    # ------------------------------------------------------------------ averaging
    def update(self, problem: Problem, **options: Any) -> CurvatureOperator:
        """Folds the estimator's curvature on ``problem`` (a mini-batch's) into the average; returns it.

        Args:
            problem: The batch's problem (:meth:`curvkit.Problem.on_batch`).
            **options: Estimator options for this update only (a Monte-Carlo ``seed``).

        Raises:
            CurvkitError: The operator has no structure to average.
            NonFiniteError: The batch's curvature is not finite (the average is unchanged).
        """
        from curvkit.registry import curvature

        op = curvature(self.estimator, problem, **{**self.options, **options}).structured()
        parts = self.fold(op)
        if not parts_finite(parts):
            raise NonFiniteError(
                f"the {self.estimator!r} curvature of this batch is not finite: not folded into the average"
            )
        self.commit(parts, op)
        average = self.operator()
        assert average is not None
        return average

    def fold(self, op: CurvatureOperator) -> Parts:
        """The average with ``op`` folded in, as :data:`Parts`; nothing is kept (see :meth:`commit`).

        ``op`` is taken in its :meth:`~curvkit.CurvatureOperator.structured` form.

        Pieces (Kronecker blocks, the diagonal, the matrix) are matched by name;
        one new to the average, or of another shape, starts from ``op``'s.

        Raises:
            CurvkitError: ``op`` has no structure to average, or another one than the average's.
        """
        op = op.structured()
        structure = structure_of(op, self.estimator)
        if self._structure is not None and structure is not self._structure:
            raise CurvkitError(
                f"a {structure.name} curvature cannot be folded into a {self._structure.name} average"
            )
        eps = self.decay
        folded: Parts = {}
        for key, new in structure.parts(op).items():
            old = self._average.get(key)
            part: dict[str, Any] = {"meta": new.get("meta", {})}
            for name, value in new.items():
                if name == "meta":
                    continue
                previous = None if old is None else old.get(name)
                if previous is None or previous.shape != value.shape or previous.dtype != value.dtype:
                    part[name] = value.clone()
                else:
                    part[name] = torch.lerp(previous, value, 1.0 - eps)  # eps * old + (1 - eps) * new
            folded[key] = part
        return folded

    def commit(self, parts: Parts, op: CurvatureOperator) -> None:
        """Keeps ``parts`` (from :meth:`fold` of ``op``) as the average, and counts the update."""
        op = op.structured()
        self._structure = structure_of(op, self.estimator)
        self._layout, self._dtype, self._device = op.layout, op.dtype, op.device
        self._average = parts
        self.updates += 1

    def operator(
        self, parts: Parts | None = None, *, like: CurvatureOperator | None = None
    ) -> CurvatureOperator | None:
        """The average (or ``parts``) as an operator; ``None`` before the first update.

        Args:
            parts: Pieces in the average's structure (default: the average).
            like: An operator whose structure, layout, dtype and device to build
                ``parts`` with (default: the average's).
        """
        chosen = self._average if parts is None else parts
        if like is not None:
            like = like.structured()
            return structure_of(like, self.estimator).build(chosen, like.layout, like.dtype, like.device)
        if self._structure is None or self._layout is None:
            return None
        assert self._dtype is not None
        return self._structure.build(chosen, self._layout, self._dtype, self._device)

    @property
    def layout(self) -> ParameterLayout | None:
        """The parameters of the average (``None`` before the first update)."""
        return self._layout

    @property
    def average(self) -> Parts:
        """The averaged pieces (:data:`Parts`), as kept."""
        return self._average

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The average and what rebuilds it: tensors, numbers and strings only."""
        layout = None
        if self._layout is not None:
            layout = {"names": list(self._layout.names), "shapes": [list(s) for s in self._layout.shapes]}
        return {
            "estimator": self.estimator,
            "decay": self.decay,
            "updates": self.updates,
            "structure": None if self._structure is None else self._structure.name,
            "layout": layout,
            "dtype": None if self._dtype is None else str(self._dtype).removeprefix("torch."),
            "device": None if self._device is None else str(self._device),
            "average": {key: dict(part) for key, part in self._average.items()},
        }

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> RunningCurvature:
        """Moves the average to ``device`` and casts it to ``dtype``; returns self.

        After loading a state saved on another device, or for a model cast to
        another dtype since (as :meth:`torch.optim.Optimizer.load_state_dict`
        casts its state to the parameters'). ``dtype=None`` keeps the dtype.
        """
        device = torch.device(device)
        self._average = {
            key: {n: _moved(v, device, dtype) for n, v in part.items()} for key, part in self._average.items()
        }
        if self._device is not None:
            self._device = device
        if self._dtype is not None and dtype is not None:
            self._dtype = dtype
        return self

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` (the estimator and its options stay this object's).

        Raises:
            ValueError: A state of another estimator, or of an unknown structure.
        """
        if state.get("estimator") != self.estimator:
            raise ValueError(
                f"a RunningCurvature state of estimator {state.get('estimator')!r}, not {self.estimator!r}"
            )
        structures = {s.name: s for s in STRUCTURES}
        name = state["structure"]
        if name is not None and name not in structures:
            raise ValueError(f"unknown averaged structure {name!r}; known: {', '.join(structures)}")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self._structure = None if name is None else structures[name]
        layout = state["layout"]
        self._layout = (
            None
            if layout is None
            else ParameterLayout(tuple(layout["names"]), tuple(torch.Size(s) for s in layout["shapes"]))
        )
        self._dtype = None if state["dtype"] is None else getattr(torch, state["dtype"])
        self._device = None if state["device"] is None else torch.device(state["device"])
        self._average = {
            key: {n: v.clone() if isinstance(v, Tensor) else v for n, v in part.items()}
            for key, part in state["average"].items()
        }
