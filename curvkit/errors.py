"""The exceptions curvkit raises.

Every error curvkit raises on purpose is a :class:`CurvkitError`. Its message is
one line that says what went wrong and what to do about it, so that the command
line can print it as it is, without a traceback.
"""

from __future__ import annotations

import re

__all__ = [
    "describe_error",
    "first_line",
    "one_line",
    "CurvkitWarning",
    "CurvkitError",
    "DataError",
    "UnboundedModelError",
    "DenseTooLargeError",
    "DuplicateEstimatorError",
    "NonDeterministicError",
    "NoExactFisherError",
    "NonConvexLossError",
    "NonFiniteError",
    "NotNegativeLogLikelihoodError",
    "ParameterSelectionError",
    "PluginError",
    "ProcessCrashedError",
    "ProcessFailedError",
    "ShapeMismatchError",
    "UnknownEstimatorError",
    "UnknownLossError",
    "UnknownOptionError",
]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
"""A terminal colour code (some libraries colour their messages)."""


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` on one line: every run of whitespace (newlines too) as one space.

    Args:
        text: Anything; its ``str``.
        limit: Cut to this many characters, the last three ``...``; ``None``: never cut.
    """
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without colour codes (``""`` when it has none)."""
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    return lines[0].strip() if lines else ""


def describe_error(exc: BaseException, message: str | None = None) -> str:
    """An exception in one line, as a failed run or plugin records it.

    Args:
        exc: The exception.
        message: What to say of it (e.g. :func:`first_line`); default its whole
            message on one line (:func:`one_line`).

    Returns:
        ``"Type: message"``, ``"Type"`` when the message is empty, and
        ``"interrupted"`` for Ctrl-C (:class:`KeyboardInterrupt`).
    """
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    message = one_line(exc) if message is None else message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class CurvkitError(Exception):
    """Base class of every error curvkit raises on purpose."""


class _AnotherProcessError(Exception):
    """What the processes of a data-parallel run learn of one that failed: its rank, and its message."""

    def __init__(self, message: str, failed: int) -> None:
        super().__init__(message)
        self.failed = failed


class ProcessFailedError(_AnotherProcessError, CurvkitError):
    """Another process of a data-parallel run failed on its shard of the data; its message is this one's.

    Raised in every process but the failed one(s), at the reduction those were
    to join (:func:`curvkit.distributed.shared_failures`), so that all end
    together with the failure's message instead of waiting in a collective.

    Attributes:
        failed: The rank of the (first) process that failed.
    """


class ProcessCrashedError(_AnotherProcessError, RuntimeError):
    """Another process of a data-parallel run raised an exception that is no curvkit error (a bug,
    memory exhausted) on its shard of the data; its type and message are this one's.

    The counterpart of :class:`ProcessFailedError` for what curvkit did not raise on
    purpose: not a :class:`CurvkitError`, so that no process goes on after it as
    after a curvkit error (the failed process does not).

    Attributes:
        failed: The rank of the (first) process that failed.
    """


class CurvkitWarning(UserWarning):
    """Something worked, but not as well as asked (e.g. a tolerance below precision)."""


class PluginError(CurvkitError):
    """A plugin is malformed or could not be loaded."""


class DuplicateEstimatorError(PluginError):
    """Two plugins register an estimator under the same name."""


class UnknownEstimatorError(CurvkitError, KeyError):
    """No registered estimator has the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class UnknownOptionError(CurvkitError, TypeError):
    """An estimator was given an option it does not take."""


class UnknownLossError(CurvkitError, ValueError):
    """The loss is neither a known name, a loss module nor a callable."""


class ParameterSelectionError(CurvkitError, ValueError):
    """The parameter selection is empty or names no parameter of the model."""


class DataError(CurvkitError, ValueError):
    """The data cannot be used: wrong type, empty, or not fitting the model."""


class ShardError(DataError):
    """A process of a data-parallel run has no batch of the data in its shard; the message names it.

    ``"process 1 of 2 has no batch of the data: ..."``, raised by that process
    (:meth:`curvkit.Problem.batches`). Its message already says which process, so
    the other processes, which learn of it at the next reduction
    (:func:`curvkit.distributed.shared_failures`), raise their
    :class:`ProcessFailedError` with it as it is, where any other failure's
    message gets ``"process r of W: "`` before it: whichever process reports it,
    the message names the process once.

    Attributes:
        process: The rank of the process whose shard it is.
    """

    def __init__(self, message: str, process: int) -> None:
        super().__init__(message)
        self.process = process


class ShapeMismatchError(CurvkitError, ValueError):
    """Operands of an operator product or sum have incompatible shapes."""


class DenseTooLargeError(CurvkitError, MemoryError):
    """A dense matrix was requested for an operator above the size limit."""


class NonDeterministicError(CurvkitError, RuntimeError):
    """Two passes over the same data gave different losses or gradients."""


class NonFiniteError(CurvkitError, FloatingPointError):
    """A product with the operator, or a value computed from it, is not finite (NaN or Inf).

    Raised by the spectral algorithms as soon as it appears, naming the product:
    a NaN never converges, so carrying on would only spend the budget.
    """


class NotNegativeLogLikelihoodError(CurvkitError, ValueError):
    """The Fisher (exact or Monte-Carlo) was asked of a loss that is not a negative log-likelihood.

    The Fisher is an expectation over targets drawn from the model's predictive
    distribution, which only a negative log-likelihood defines: a custom callable
    without a sampler, or a cross-entropy with class weights or label smoothing,
    is not one.
    """


class NoExactFisherError(CurvkitError, ValueError):
    """The exact Fisher was asked of a negative log-likelihood known only through its sampler."""


class UnsupportedModelError(CurvkitError, ValueError):
    """An estimator does not support a module or an architecture of the model (the message names
    the modules and the ways out); the conformance battery skips such cases, saying why."""


class NonConvexLossError(CurvkitError, ValueError):
    """The loss's Hessian w.r.t. the model outputs is indefinite: it has no symmetric factor."""


class UnboundedModelError(CurvkitError, ValueError):
    """The cubic model has no minimiser: it decreases without bound along a direction.

    That direction lies on subsets the cubic term does not see (``lambda_int = 0``,
    or ``d_s = 0``): ``H_bar`` restricted to them has a negative eigenvalue, or is
    singular with ``g_bar`` (or the coupling to the other subsets) not orthogonal
    to its null space.
    """
