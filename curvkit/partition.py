"""Partitions of a model's parameters into subsets: the subsets of the Newton summary.

P. Wolinski ("Adapting Newton's Method to Neural Networks through a Summary of
Higher-Order Derivatives", arXiv 2312.03885, 2023) gives each subset ``T_s`` of
a partition of the parameters its own learning rate. A partition here is the
pair ``(param_groups, name_groups)`` of the reference package: ``param_groups``
as ``torch.optim`` takes them (``[{"params": [tensor, ...]}, ...]``) and
``name_groups`` the parameters' names, subset by subset. Every function returns
that pair for the parameters that require gradients, each in exactly one subset,
in the model's order:

* :func:`canonical`: one subset per tensor;
* :func:`trivial`: one subset holding every parameter;
* :func:`wb`: the weights (names ending in ``weight``), the biases (``bias``),
  and the rest, empty subsets left out;
* :func:`custom`: subsets given as lists of tensors, names or name globs.

:func:`named` picks one of the first three by name (``curvkit analyze --summary wb``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from curvkit.errors import CurvkitError

__all__ = ["PARTITIONS", "Partition", "canonical", "custom", "named", "trivial", "wb"]

Partition = tuple[list[dict[str, Any]], list[list[str]]]
"""``(param_groups, name_groups)``."""


def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    found = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not found:
        raise CurvkitError(
            f"{type(model).__name__} has no parameter that requires grad: nothing to partition"
        )
    return found


def _pair(model: nn.Module, names: list[list[str]]) -> Partition:
    tensors = dict(model.named_parameters())
    return [{"params": [tensors[n] for n in group]} for group in names], names


def canonical(model: nn.Module) -> Partition:
    """One subset per parameter tensor."""
    return _pair(model, [[name] for name, _ in _trainable(model)])


def trivial(model: nn.Module) -> Partition:
    """One subset holding every parameter (the summary is then ``g.u / u^T H u``)."""
    return _pair(model, [[name for name, _ in _trainable(model)]])


def wb(model: nn.Module) -> Partition:
    """Three subsets: the weights, the biases, and the rest (empty ones left out).

    A weight is a parameter whose name ends in ``weight``, a bias one ending in ``bias``.
    """
    groups: dict[str, list[str]] = {"weight": [], "bias": [], "rest": []}
    for name, _ in _trainable(model):
        last = name.rsplit(".", 1)[-1]
        groups["weight" if last.endswith("weight") else "bias" if last.endswith("bias") else "rest"].append(
            name
        )
    return _pair(model, [group for group in groups.values() if group])


PARTITIONS = {"canonical": canonical, "trivial": trivial, "wb": wb}
"""The partitions known by name."""


def named(model: nn.Module, name: str) -> Partition:
    """The partition called ``name`` (a key of :data:`PARTITIONS`).

    Raises:
        CurvkitError: An unknown name.
    """
    if name not in PARTITIONS:
        raise CurvkitError(
            f"unknown partition {name!r}; use one of {', '.join(PARTITIONS)} (or a custom one)"
        )
    return PARTITIONS[name](model)


def custom(model: nn.Module, subsets: Sequence[Sequence[Tensor | str] | str]) -> Partition:
    """A partition from subsets given as tensors, names or name globs (``"encoder.*"``).

    A subset may be one string (a name or a glob) or a list of tensors and
    strings. Every parameter that requires grad must fall in exactly one subset.

    Raises:
        CurvkitError: An empty subset, a name or glob that matches nothing, a tensor
            that is not a trainable parameter of the model, a parameter in two
            subsets, or one in none (all named).
    """
    trainable = _trainable(model)
    names = [name for name, _ in trainable]
    by_id = {id(p): name for name, p in trainable}
    owner: dict[str, int] = {}
    groups: list[list[str]] = []
    for s, subset in enumerate(subsets):
        items = [subset] if isinstance(subset, str | Tensor) else list(subset)
        group: list[str] = []
        for item in items:
            if isinstance(item, Tensor):
                if id(item) not in by_id:
                    raise CurvkitError(
                        f"subset {s}: a tensor of shape {tuple(item.shape)} is not a trainable parameter"
                    )
                matched = [by_id[id(item)]]
            else:
                matched = [n for n in names if fnmatch.fnmatchcase(n, item)]
                if not matched:
                    raise CurvkitError(f"subset {s}: {item!r} matches no trainable parameter")
            for name in matched:
                if name in owner and owner[name] != s:
                    raise CurvkitError(
                        f"parameter {name!r} is in subsets {owner[name]} and {s}: subsets must not overlap"
                    )
                if name not in group:
                    owner[name] = s
                    group.append(name)
        if not group:
            raise CurvkitError(f"subset {s} is empty")
        groups.append(sorted(group, key=names.index))
    missing = [n for n in names if n not in owner]
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CurvkitError(
            f"the partition misses {len(missing)} parameter(s): {shown}; every one needs a subset"
        )
    return _pair(model, groups)
