"""Whether tensors are finite, checked in one fused call: the never-NaN rule of steps and running averages.

Used by the optimizers (:mod:`curvkit.optim`), which skip a step whose inputs,
new state or updates are not finite, and by :class:`curvkit.RunningCurvature`,
which refuses to fold a non-finite batch into its average.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "first_non_finite", "outside_autograd"]

_REAL_FLOATING = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
"""The usual real floating dtypes, checked as they are (others go through the slower dtype tests)."""


def outside_autograd() -> contextlib.AbstractContextManager:
    """:func:`torch.no_grad` if gradients are being recorded, else a context that does nothing.

    For in-place work on tensors that may require grad (a check, an
    optimizer's update of its parameters) called both inside and outside
    ``torch.no_grad``: entering ``torch.no_grad`` costs about 1.6 microseconds on
    the CPU (an eighth of a small model's finiteness check), a no-op context a
    fifth of that (and that one context, :data:`_NO_CONTEXT`, is made once).
    """
    return torch.no_grad() if torch.is_grad_enabled() else _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()
"""The context that does nothing (reusable: it keeps no state)."""


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

    The check works in place (times 1), so it runs outside autograd's record
    (:func:`torch.no_grad`, entered only if gradients are being recorded). It
    is one function, without helpers to call, as a step's cost on small models
    is mostly the first run of each function it calls (see
    :meth:`curvkit.optim.diagonal.HutchinsonOptimizer._step`).
    """
    if torch.is_grad_enabled():
        with torch.no_grad():
            return all_finite(tensors)
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
        device = t.device
        same = by_device.get(device)
        if same is None:
            by_device[device] = [t]
        else:
            same.append(t)
    flags = []
    finite = False
    try:
        for device, group in by_device.items():
            found = getattr(_cpu_scratch, "flag", None) if device == _CPU else None  # kept: _flag_and_unit
            if found is None:
                found, one = _flag_and_unit(device)
            else:
                one = _CPU_UNIT
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
            flags.append(found)
        finite = True
        for found in flags:  # one synchronisation per device
            if found:
                finite = False
                break
    finally:
        if not finite:  # a raised flag (or one a failed check may have raised) is not used again
            _cpu_scratch.flag = None
    return finite


_CPU = torch.device("cpu")
_CPU_UNIT = torch.ones(1, dtype=torch.float32)
"""The check's scale on the CPU (the kernel only reads it). Flag and scale are float32 whatever
the default dtype (``torch.set_default_dtype(torch.float64)``), as the kernel requires."""

_cpu_scratch = threading.local()
"""Per thread, the CPU check's flag while it is down (``flag``), so that a check makes no tensor."""


def _flag_and_unit(device: torch.device) -> tuple[Tensor, Tensor]:
    """The check's flag (a zero) and its scale (a one), one-entry tensors on ``device``.

    On the CPU both are made once (the flag once per thread, and again after it
    was raised): a tensor's creation is a microsecond, a tenth of the whole check
    on small models. On an accelerator both are made per call, on the current
    stream, so that the check never reads one whose filling another stream may
    not have finished. The flag is made outside inference mode: torch forbids
    in-place writes to an inference tensor outside it (the fused kernel does not
    enforce that in torch 2.13, so this is for the versions that will).
    """
    if device != _CPU:
        options = {"device": device, "dtype": torch.float32}
        return torch.zeros(1, **options), torch.ones(1, **options)
    flag = getattr(_cpu_scratch, "flag", None)
    if flag is None:
        with torch.inference_mode(False):
            flag = _cpu_scratch.flag = torch.zeros(1, dtype=torch.float32)
    return flag, _CPU_UNIT


def first_non_finite(
    checks: Sequence[tuple[str, Sequence[Tensor | None]]], implied: Collection[str] = ()
) -> str | None:
    """The name of the first ``(name, tensors)`` pair with a non-finite entry, or ``None`` if all are finite.

    All the tensors are checked in one :func:`all_finite` call; only when one is
    not finite are the pairs checked one by one, to name it.

    Args:
        checks: ``(name, tensors)`` pairs, in the order in which to name them.
        implied: Names whose tensors the one call leaves out because they are
            finite whenever the checked ones are: either another pair's tensors
            carry them (every entry reaches a checked tensor through arithmetic
            that keeps a non-finite value non-finite: an optimizer's gradient, in
            a checked moving average of weight ``> 0`` of it), or they are a
            bounded function of checked tensors (SophiaH's clipped step of its
            checked moments). They are still checked, in their place, to name
            the culprit when something is not finite.
    """
    checked: list[Tensor | None] = []
    for name, tensors in checks:  # a loop, not a comprehension (a function of its own to run)
        if name not in implied:
            checked += tensors
    if all_finite(checked):
        return None
    return next((name for name, tensors in checks if not all_finite(tensors)), None)
