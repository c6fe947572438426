"""Checks of numeric arguments: one set of rules, one message format.

The rules:

* A **number** is a Python or NumPy real (``int``, ``float``,
  ``numpy.float32``, ...) or a real tensor of one element (a value computed
  with torch, e.g. ``2 * abs(lambda_min)``), taken as its value; never a bool.
* A **positive** or **non-negative** number must also be finite: ``inf`` and
  ``nan`` are refused (an infinite tolerance stops a solver before its first
  step, an infinite damping has no inverse).
* A **relative tolerance** is a number in ``(0, 1)``: a residual is measured
  relative to ``||A||`` or ``||b||``, which every unit vector's Rayleigh residual
  and the zero solution's residual already reach, so a tolerance of 1 or more
  would mark anything converged.
* An **integer** is a Python or NumPy integer, never a bool (nor a float with
  an integral value, nor a tensor). A **seed** is an integer in ``[0, 2**63)``.
* With ``plain=True`` (:func:`positive_number`, :func:`non_negative_number`,
  :func:`relative_tolerance`, :func:`fraction`, :func:`integer`) only a Python ``int`` or ``float`` (a
  subclass included: ``numpy.float64`` is one; an ``int`` for :func:`integer`)
  is taken, never a tensor nor another NumPy number: for
  a value kept as given, where it must stay a plain number (an analysis's options,
  stored as they are in its run's request). The message then says ``a finite
  Python number``, ``a Python integer`` for a value of another type.
* The error raised is the caller's (``error=``), :class:`~curvkit.CurvkitError`
  by default; :mod:`curvkit.optim` raises :class:`ValueError`, as
  :mod:`torch.optim` does. Its message is one line naming the argument as the
  caller spells it (``damping``, ``--damping``), the range and the value given:
  ``damping must be a finite number >= 0, got inf``, ``maxiter must be an integer
  >= 1, got 0``.

Each check returns the value as a plain Python ``float`` or ``int``, which is
what a caller keeps (results files store plain numbers). Estimator plugins use
them for their own options, and solver plugins declare them for theirs
(:attr:`curvkit.SolverSpec.option_checks`)::

    from curvkit.arguments import integer

    mc_samples = integer(mc_samples, "mc_samples")

Example:
    >>> import torch
    >>> from curvkit.arguments import integer, positive_number
    >>> positive_number(torch.tensor([0.5]), "scale")
    0.5
    >>> positive_number(float("inf"), "scale")
    Traceback (most recent call last):
    ...
    curvkit.errors.CurvkitError: scale must be a finite number > 0, got inf
    >>> integer(0, "maxiter", error=ValueError)
    Traceback (most recent call last):
    ...
    ValueError: maxiter must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, overload

from torch import Tensor

from curvkit.errors import CurvkitError

__all__ = [
    "SEED_LIMIT",
    "fraction",
    "integer",
    "non_negative_number",
    "positive_number",
    "relative_tolerance",
    "seed",
]

SEED_LIMIT = 2**63
"""Seeds are integers in ``[0, SEED_LIMIT)``: torch's generators take them (and a seed plus a
count), and results files store them as 64-bit integers."""


def _real(value: Any, plain: bool = False) -> float | None:
    """``value`` as a float if it is a number (see the module's rules), else ``None``."""
    if plain:
        return None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _is_integer(value: Any, plain: bool) -> bool:
    """Whether ``value`` is an integer (see the module's rules): never a bool."""
    return not isinstance(value, bool) and isinstance(value, int if plain else numbers.Integral)


def _python(value: Any, plain: bool) -> str:
    """What the messages put before ``number`` or ``integer``: ``"Python "`` where ``plain`` refuses
    the value for its type (a tensor, a NumPy number), ``""`` where it is the range that refuses it."""
    return "Python " if plain and not isinstance(value, int | float) else ""


def positive_number(
    value: Any, name: str, *, plain: bool = False, error: type[Exception] = CurvkitError
) -> float:
    """``value`` as a float if it is a finite number ``> 0`` (with ``plain``, a Python one).

    Raises:
        error: Anything else, ``"{name} must be a finite number > 0, got {value!r}"``.
    """
    number = _real(value, plain)
    if number is None or not 0 < number < math.inf:
        raise error(f"{name} must be a finite {_python(value, plain)}number > 0, got {value!r}")
    return number


def non_negative_number(
    value: Any, name: str, *, plain: bool = False, error: type[Exception] = CurvkitError
) -> float:
    """``value`` as a float if it is a finite number ``>= 0`` (with ``plain``, a Python one).

    Raises:
        error: Anything else, ``"{name} must be a finite number >= 0, got {value!r}"``.
    """
    number = _real(value, plain)
    if number is None or not 0 <= number < math.inf:
        raise error(f"{name} must be a finite {_python(value, plain)}number >= 0, got {value!r}")
    return number


def relative_tolerance(
    value: Any, name: str, *, plain: bool = False, error: type[Exception] = CurvkitError
) -> float:
    """``value`` as a float if it is a number in ``(0, 1)`` (with ``plain``, a Python one): a tolerance on a
    relative residual.

    An eigenpair's residual ``||A v - lambda v||`` is held to ``tol * ||A||`` and a
    solve's ``||b - A x||`` to ``tol * ||b||``; any unit vector with its Rayleigh
    quotient, and ``x = 0``, reach a relative residual of at most 1, so a
    tolerance of 1 or more certifies nothing.

    Raises:
        error: Anything else, ``"{name} must be a number in (0, 1) (1 is met by any vector), got
            {value!r}"``.

    Example:
        >>> relative_tolerance(1e-4, "--tol")
        0.0001
        >>> relative_tolerance(2, "--tol")
        Traceback (most recent call last):
        ...
        curvkit.errors.CurvkitError: --tol must be a number in (0, 1) (1 is met by any vector), got 2
    """
    number = _real(value, plain)
    if number is None or not 0 < number < 1:
        what = f"a {_python(value, plain)}number in (0, 1)"
        raise error(f"{name} must be {what} (1 is met by any vector), got {value!r}")
    return number


def fraction(
    value: Any,
    name: str,
    *,
    below_one: bool = False,
    plain: bool = False,
    error: type[Exception] = CurvkitError,
) -> float:
    """``value`` as a float if it is a number in ``[0, 1]`` (``[0, 1)`` with ``below_one``; with
    ``plain``, a Python one).

    Raises:
        error: Anything else, ``"{name} must be a number in [0, 1], got {value!r}"``.
    """
    number = _real(value, plain)
    if number is None or not (0 <= number < 1 if below_one else 0 <= number <= 1):
        interval = "[0, 1)" if below_one else "[0, 1]"
        raise error(f"{name} must be a {_python(value, plain)}number in {interval}, got {value!r}")
    return number


@overload
def integer(
    value: Any,
    name: str,
    *,
    minimum: int = ...,
    allow_none: Literal[False] = ...,
    plain: bool = ...,
    error: type[Exception] = ...,
) -> int: ...


@overload
def integer(
    value: Any,
    name: str,
    *,
    minimum: int = ...,
    allow_none: bool,
    plain: bool = ...,
    error: type[Exception] = ...,
) -> int | None: ...


def integer(
    value: Any,
    name: str,
    *,
    minimum: int = 1,
    allow_none: bool = False,
    plain: bool = False,
    error: type[Exception] = CurvkitError,
) -> int | None:
    """``value`` as an int if it is an integer ``>= minimum`` (with ``plain``, a Python one);
    ``None`` as it is with ``allow_none``.

    Raises:
        error: Anything else, ``"{name} must be an integer >= {minimum}, got {value!r}"``
            (``"... or None, ..."`` with ``allow_none``).
    """
    if value is None and allow_none:
        return None
    if not _is_integer(value, plain) or value < minimum:
        what = "a Python integer" if _python(value, plain) else "an integer"
        none = " or None" if allow_none else ""
        raise error(f"{name} must be {what} >= {minimum}{none}, got {value!r}")
    return int(value)


@overload
def seed(value: Any, name: str, *, allow_none: Literal[False] = ..., error: type[Exception] = ...) -> int: ...


@overload
def seed(value: Any, name: str, *, allow_none: bool, error: type[Exception] = ...) -> int | None: ...


def seed(
    value: Any, name: str, *, allow_none: bool = False, error: type[Exception] = CurvkitError
) -> int | None:
    """``value`` as an int if it is an integer in ``[0, 2**63)`` (:data:`SEED_LIMIT`): a seed.

    An integer as :func:`integer` takes it (not a bool, nor a float). ``None`` is
    returned as it is with ``allow_none`` (an estimator's "draw a fresh seed").

    Raises:
        error: Anything else, ``"{name} must be an integer >= 0 and < 2**63, got {value!r}"``
            (``"... or None, ..."`` with ``allow_none``).
    """
    if value is None and allow_none:
        return None
    if not _is_integer(value, False) or not 0 <= value < SEED_LIMIT:
        none = " or None" if allow_none else ""
        raise error(f"{name} must be an integer >= 0 and < 2**63{none}, got {value!r}")
    return int(value)
