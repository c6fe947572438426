"""Whether tensors are finite, checked in one fused call: the never-NaN rule of steps and running averages.

Used by the optimizers (:mod:`curvkit.optim`), which skip a step whose inputs,
new state or updates are not finite, and by :class:`curvkit.RunningCurvature`,
which refuses to fold a non-finite batch into its average.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "first_non_finite"]

_REAL_FLOATING = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
"""The usual real floating dtypes, checked as they are (others go through the slower dtype tests)."""


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every entry of every tensor (``None`` skipped) is finite, in one synchronisation per device.

    With the fused check :class:`torch.amp.GradScaler` runs on gradients,
    ``torch._amp_foreach_non_finite_check_and_unscale_``, given the scale 1 (so
    the values are multiplied by 1, i.e. left as they are): one call per device
    raises a flag if any entry of any of its tensors is infinite or NaN, and
    only the flags come back to the host. On small models that is about ten
    times faster than max-norms per tensor (``torch._foreach_norm``) and twenty
    times faster than a check per tensor, a visible share of a cheap
    optimizer's step. Integer tensors are always finite and are skipped;
    complex ones are checked through their real view.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t is None:
            continue
        dtype = t.dtype
        if dtype not in _REAL_FLOATING:  # one set look-up for the usual case: a step's cost on small models
            if dtype.is_complex:
                t = torch.view_as_real(t)
            elif not dtype.is_floating_point:
                continue
        by_device.setdefault(t.device, []).append(t)
    flags = []
    with torch.no_grad():
        for device, group in by_device.items():
            found = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
            flags.append(found)
    return not any(bool(found) for found in flags)  # one synchronisation per device


def first_non_finite(
    checks: Sequence[tuple[str, Sequence[Tensor | None]]], implied: Collection[str] = ()
) -> str | None:
    """The name of the first ``(name, tensors)`` pair with a non-finite entry, or ``None`` if all are finite.

    All the tensors are checked in one :func:`all_finite` call; only when one is
    not finite are the pairs checked one by one, to name it.

    Args:
        checks: ``(name, tensors)`` pairs, in the order in which to name them.
        implied: Names whose tensors the one call leaves out because another
            pair's tensors carry them: every entry of theirs reaches a checked
            tensor through arithmetic that keeps a non-finite value non-finite
            (an optimizer's gradient, in a moving average of weight ``> 0`` of
            it that is checked as new state). They are still checked, in their
            place, to name the culprit when something is not finite.
    """
    if all_finite([t for name, tensors in checks if name not in implied for t in tensors]):
        return None
    return next((name for name, tensors in checks if not all_finite(tensors)), None)
