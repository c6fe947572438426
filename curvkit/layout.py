"""How a selection of parameters is laid out as one flat vector.

The flattening order is defined here, once, for all of curvkit: parameters come
in the order of :meth:`torch.nn.Module.named_parameters` (which lists a tied
parameter once, under its first name), and each tensor is flattened in row-major
(C) order with :meth:`torch.Tensor.reshape`. Entry ``offsets[i]`` of the flat
vector is the first element of parameter ``names[i]``.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from curvkit.errors import ParameterSelectionError, ShapeMismatchError
from curvkit.remedies import setting

__all__ = ["ParameterLayout", "select_parameters"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of the parameters behind a flat vector of length ``P``.

    Attributes:
        names: Parameter names, in flattening order.
        shapes: The shape of each parameter.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @functools.cached_property
    def numels(self) -> tuple[int, ...]:
        """Number of elements of each parameter."""
        return tuple(math.prod(s) for s in self.shapes)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat vector."""
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return tuple(out)

    @functools.cached_property
    def dim(self) -> int:
        """``P``, the length of the flat vector."""
        return sum(self.numels)

    def slices(self) -> dict[str, slice]:
        """The slice of the flat vector that holds each parameter."""
        return {n: slice(o, o + k) for n, o, k in zip(self.names, self.offsets, self.numels)}

    def flatten(self, tensors: Sequence[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat tensor.

        Args:
            tensors: One tensor per parameter, of shape ``shape`` followed by
                ``batch_dims`` trailing dimensions (``[*shape, K]`` for K columns).
            batch_dims: Number of trailing dimensions kept (0 or 1).

        Returns:
            A tensor ``[P]`` (``batch_dims=0``) or ``[P, K]``.
        """
        if len(tensors) != len(self.shapes):
            raise ShapeMismatchError(
                f"expected {len(self.shapes)} tensors (one per parameter), got {len(tensors)}"
            )
        flat = []
        for t, shape, numel in zip(tensors, self.shapes, self.numels):
            lead = tuple(t.shape[: t.dim() - batch_dims])
            if lead != tuple(shape):
                raise ShapeMismatchError(
                    f"a per-parameter tensor has shape {tuple(t.shape)}, "
                    f"expected {tuple(shape)} plus {batch_dims} trailing dimension(s)"
                )
            flat.append(t.reshape(numel, *t.shape[t.dim() - batch_dims :]))
        trailing = {tuple(f.shape[1:]) for f in flat}
        if len(trailing) > 1:
            raise ShapeMismatchError(
                f"per-parameter tensors disagree on their trailing dimension(s): {sorted(trailing)}"
            )
        return torch.cat(flat, dim=0)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat ``[P]`` or ``[P, K]`` tensor into per-parameter views."""
        trailing = tuple(flat.shape[1:])
        parts = torch.split(flat, list(self.numels), dim=0)
        return [p.reshape(tuple(s) + trailing) for p, s in zip(parts, self.shapes)]

    def sub_layout(self, names: Iterable[str]) -> ParameterLayout:
        """The layout of a subset of the parameters, kept in this layout's order."""
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise ParameterSelectionError(
                f"unknown parameter(s) {sorted(unknown)}; available: {list(self.names)}"
            )
        keep = [(n, s) for n, s in zip(self.names, self.shapes) if n in wanted]
        return ParameterLayout(tuple(n for n, _ in keep), tuple(s for _, s in keep))

    def indices(self, names: Iterable[str]) -> torch.Tensor:
        """Positions in the flat vector of the given parameters (in layout order)."""
        sl = self.slices()
        sub = self.sub_layout(names)
        return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in sub.names])


def select_parameters(
    module: torch.nn.Module, params: str | Sequence[str] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """Pick parameters of ``module`` by exact name or glob pattern.

    Args:
        module: The model.
        params: ``None`` for every parameter that requires grad; ``"all"`` for
            every parameter, frozen ones (``requires_grad=False``) included;
            otherwise a name, a glob pattern (``"fc1.*"``, ``"*.weight"``) or a
            list of them. A name that is a module prefix selects the module's
            parameters (``"0"`` selects ``"0.weight"`` and ``"0.bias"``).

    Returns:
        ``(name, parameter)`` pairs in :meth:`~torch.nn.Module.named_parameters`
        order.

    Raises:
        ParameterSelectionError: A pattern matches nothing, or nothing is selected.
    """
    named = list(module.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif params == "all" or (not isinstance(params, str) and list(params) == ["all"]):
        chosen = named
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        chosen_names: set[str] = set()
        for pat in patterns:
            hits = {n for n, _ in named if n == pat or fnmatch.fnmatchcase(n, pat) or n.startswith(pat + ".")}
            if not hits:
                raise ParameterSelectionError(
                    f"parameter pattern {pat!r} matches no parameter; available: {[n for n, _ in named]}"
                )
            chosen_names |= hits
        chosen = [(n, p) for n, p in named if n in chosen_names]
    if not chosen:
        raise ParameterSelectionError(
            "no parameter selected (none requires grad?); name them (names or globs) with "
            f"{setting('params', 'NAMES', python='NAMES')}, or take every one, frozen ones included, with "
            f"{setting('params', 'all')}"
        )
    return chosen
