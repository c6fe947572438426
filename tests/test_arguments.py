"""curvkit.arguments: the rules of numeric arguments, each check's range and error class."""

from __future__ import annotations

import fractions
import math

import numpy as np
import pytest
import torch

import curvkit
from curvkit.arguments import (
    fraction,
    integer,
    non_negative_number,
    positive_number,
    relative_tolerance,
    seed,
)

# --------------------------------------------------------------------------- what a number is


@pytest.mark.parametrize(
    "value",
    [
        2,
        2.0,
        np.float32(2.0),
        np.float64(2.0),
        np.int64(2),
        fractions.Fraction(2),
        torch.tensor(2.0),
        torch.tensor([2.0]),
        torch.tensor([[2.0]], dtype=torch.float64),
        torch.tensor(2),  # an integer tensor is a real number
        torch.tensor(2.0, requires_grad=True),
    ],
    ids=repr,
)
def test_a_number_is_a_real_or_a_one_element_real_tensor_taken_as_a_plain_float(value):
    for check in (positive_number, non_negative_number):
        got = check(value, "x")
        assert got == 2.0 and type(got) is float


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        np.bool_(True),
        torch.tensor(True),
        torch.tensor([1.0, 2.0]),
        torch.tensor([]),
        torch.tensor(1 + 0j),
        1 + 0j,
        "1",
        None,
        [1.0],
        np.array([1.0]),
    ],
    ids=repr,
)
def test_anything_else_is_not_a_number(value):
    for check in (positive_number, non_negative_number, fraction):
        with pytest.raises(curvkit.CurvkitError, match=r"^x must be a"):
            check(value, "x")


@pytest.mark.parametrize(
    "value", [math.inf, -math.inf, math.nan, np.float64(math.inf), torch.tensor(math.nan)], ids=repr
)
def test_positive_and_non_negative_numbers_are_finite(value):
    with pytest.raises(curvkit.CurvkitError, match=r"^tol must be a finite number > 0, got "):
        positive_number(value, "tol")
    with pytest.raises(curvkit.CurvkitError, match=r"^damping must be a finite number >= 0, got "):
        non_negative_number(value, "damping")


# --------------------------------------------------------------------------- each range


def test_positive_number():
    assert positive_number(1e-300, "tol") == 1e-300
    for value, shown in ((0, "0"), (0.0, "0.0"), (-1e-3, "-0.001"), (math.inf, "inf")):
        with pytest.raises(curvkit.CurvkitError) as info:
            positive_number(value, "tol")
        assert str(info.value) == f"tol must be a finite number > 0, got {shown}"


def test_non_negative_number():
    assert non_negative_number(0, "damping") == 0.0
    assert non_negative_number(-0.0, "damping") == 0.0
    with pytest.raises(curvkit.CurvkitError) as info:
        non_negative_number(-1, "--damping")
    assert str(info.value) == "--damping must be a finite number >= 0, got -1"


def test_fraction():
    for value in (0, 0.5, 1, np.float32(0.25), torch.tensor([1.0])):
        assert type(fraction(value, "momentum")) is float
    assert fraction(0.0, "decay", below_one=True) == 0.0
    for value in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(curvkit.CurvkitError, match=r"^momentum must be a number in \[0, 1\], got "):
            fraction(value, "momentum")
    with pytest.raises(curvkit.CurvkitError) as info:
        fraction(1.0, "decay", below_one=True)
    assert str(info.value) == "decay must be a number in [0, 1), got 1.0"


def test_relative_tolerance_is_below_one():
    """A residual relative to ``||A||`` (or ``||b||``) of 1 is met by any unit vector (``x = 0``):
    ``--tol 2`` marked two Ritz pairs of a 5,181-parameter ResNet converged after two products, the
    second 0.04 for a true 494, and held ``--check`` to the same meaningless bound."""
    for value in (1e-300, 1e-4, 0.999, np.float32(0.25), torch.tensor([1e-6])):
        assert type(relative_tolerance(value, "tol")) is float
    for value in (0, -1e-3, 1, 1.0, 2, math.inf, math.nan, True, "1e-4"):
        with pytest.raises(curvkit.CurvkitError) as info:
            relative_tolerance(value, "--tol")
        assert str(info.value) == f"--tol must be a number in (0, 1) (1 is met by any vector), got {value!r}"


def test_integer():
    for value in (1, 7, np.int64(7), np.uint8(7), 2**70):
        got = integer(value, "maxiter")
        assert got == value and type(got) is int
    assert integer(0, "seed", minimum=0) == 0
    assert integer(None, "max_matvecs", allow_none=True) is None
    assert integer(3, "max_matvecs", allow_none=True) == 3
    for value in (0, -1, 2.0, 2.5, True, np.bool_(True), torch.tensor(2), "2", None, math.inf):
        with pytest.raises(curvkit.CurvkitError) as info:
            integer(value, "maxiter")
        assert str(info.value) == f"maxiter must be an integer >= 1, got {value!r}"
    with pytest.raises(curvkit.CurvkitError, match=r"^grid_size must be an integer >= 2, got 1$"):
        integer(1, "grid_size", minimum=2)
    with pytest.raises(curvkit.CurvkitError, match=r"^batch_size must be an integer >= 1 or None, got 0$"):
        integer(0, "batch_size", allow_none=True)


@pytest.mark.parametrize(
    "check, good, message",
    [
        (positive_number, 0.5, "x must be a finite Python number > 0, got "),
        (non_negative_number, 0.5, "x must be a finite Python number >= 0, got "),
        (fraction, 0.5, "x must be a Python number in [0, 1], got "),
        (relative_tolerance, 0.5, "x must be a Python number in (0, 1) (1 is met by any vector), got "),
        (integer, 5, "x must be a Python integer >= 1, got "),
    ],
    ids=lambda x: getattr(x, "__name__", repr(x)),
)
def test_plain_takes_python_numbers_only(check, good, message):
    """For a value kept as given (an analysis's options, stored in its run's request): the ``ihvp`` and
    ``summary`` kinds each checked "a Python number" before the range, one rule in two places."""
    assert check(good, "x", plain=True) == good and check(good, "x") == good
    others = [torch.tensor(good), torch.tensor([good]), np.int64(5), np.float32(0.5), "1", None]
    for value in others:
        with pytest.raises(curvkit.CurvkitError) as info:
            check(value, "x", plain=True)
        assert str(info.value) == f"{message}{value!r}"
    numpy = np.int64(good) if check is integer else np.float32(good)
    assert check(numpy, "x") == good  # a number, not a plain one
    if check is not integer:
        assert check(np.float64(good), "x", plain=True) == good  # a subclass of float
    for value in (-1, True):  # a Python value out of range: the range's message, as without plain
        messages = []
        for plain in (True, False):
            with pytest.raises(curvkit.CurvkitError) as info:
                check(value, "x", plain=plain)
            messages.append(str(info.value))
        assert messages[0] == messages[1] and "Python" not in messages[0]


# --------------------------------------------------------------------------- the caller's error class


@pytest.mark.parametrize(
    "check, bad",
    [(positive_number, 0), (non_negative_number, -1), (fraction, 2), (integer, 0)],
    ids=lambda x: getattr(x, "__name__", repr(x)),
)
@pytest.mark.parametrize("error", [curvkit.CurvkitError, curvkit.DataError, ValueError])
def test_the_error_class_is_the_callers(check, bad, error):
    with pytest.raises(error) as info:
        check(bad, "x", error=error)
    assert type(info.value) is error
    assert "\n" not in str(info.value)


def test_the_default_error_is_curvkit_error_and_not_value_error():
    with pytest.raises(curvkit.CurvkitError) as info:
        integer(0, "x")
    assert not isinstance(info.value, ValueError)


def test_the_module_is_public_for_plugins():
    assert curvkit.arguments.integer is integer
    assert set(curvkit.arguments.__all__) == {
        "SEED_LIMIT",
        "fraction",
        "integer",
        "non_negative_number",
        "positive_number",
        "relative_tolerance",
        "seed",
    }


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("value", [0, 7, np.int64(7), 2**63 - 1], ids=repr)
def test_a_seed_is_an_integer_in_0_to_2_63(value):
    got = seed(value, "seed")
    assert got == value and type(got) is int


@pytest.mark.parametrize("value", [-1, 2**63, 1.5, 1.0, "abc", True, None, torch.tensor(1)], ids=repr)
def test_anything_else_is_not_a_seed(value):
    with pytest.raises(curvkit.CurvkitError) as info:
        seed(value, "fisher.seed")
    assert str(info.value) == f"fisher.seed must be an integer >= 0 and < 2**63, got {value!r}"
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0 and < 2\*\*63, got "):
        seed(value, "seed", error=ValueError)


def test_a_seed_may_be_none_when_allowed():
    assert seed(None, "seed", allow_none=True) is None
    with pytest.raises(
        curvkit.CurvkitError, match=r"^seed must be an integer >= 0 and < 2\*\*63 or None, got -1$"
    ):
        seed(-1, "seed", allow_none=True)
