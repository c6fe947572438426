"""What every curvkit optimizer shares: checked hyper-parameters, never-NaN steps, the batch's problem, state.

:class:`CurvatureOptimizer` is a :class:`torch.optim.Optimizer` with

* **checked hyper-parameters**: :func:`check_positive`, :func:`check_fraction`,
  :func:`check_integer` and :func:`check_choice` raise one-line
  :class:`ValueError` s naming the hyper-parameter and the accepted range
  (the rules and messages of :mod:`curvkit.arguments`: a NumPy number or a
  one-element tensor is a number, kept as a float);
* **never NaN parameters**: :meth:`CurvatureOptimizer.apply_updates` adds the
  step's updates only when every one is finite (one host-device
  synchronisation for all of them); otherwise the parameters are left as they
  were, :attr:`~CurvatureOptimizer.skipped_steps` counts it and a
  :class:`curvkit.CurvkitWarning` says why;
* **the batch's problem**: optimizers that use a curvature estimator take the
  model (``model=``) and the loss (``loss_fn=``, as :class:`curvkit.Problem`
  takes it) and build :meth:`~CurvatureOptimizer.batch_problem` for each step:
  a :class:`curvkit.Problem` of the current mini-batch through
  :meth:`curvkit.Problem.on_batch` (no copy, no determinism probe), whose
  estimators run the very per-batch products the analyses run;
* **state**: :meth:`~CurvatureOptimizer.state_dict` adds what a subclass keeps
  outside ``torch.optim``'s per-parameter state (:meth:`extra_state` /
  :meth:`load_extra_state`), so that training resumes bit-identically.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from curvkit.arguments import fraction, integer, non_negative_number, positive_number, seed
from curvkit.compiled import original_module
from curvkit.distributed import is_data_parallel
from curvkit.errors import CurvkitWarning, UnknownOptionError
from curvkit.estimator_spec import EstimatorSpec
from curvkit.finite import all_finite, first_non_finite, outside_autograd
from curvkit.losses import resolve_loss
from curvkit.problem import Problem
from curvkit.registry import check_options, estimator_options

T = TypeVar("T")

__all__ = [
    "CurvatureOptimizer",
    "all_finite",
    "by_group",
    "check_betas",
    "check_choice",
    "check_entries",
    "check_estimator_options",
    "check_flag",
    "check_fraction",
    "check_integer",
    "check_learning_rate",
    "check_model_and_loss",
    "check_positive",
    "check_seed",
    "first_non_finite",
    "floating_tensors",
    "full_precision",
    "levenberg_marquardt",
    "loss_at",
    "mode_dependent_modules",
    "optional",
    "unpack_batch",
]


def unpack_batch(owner: str, batch: Any, when: str = "") -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of ``step(batch=...)``, or a one-line ValueError saying how to call the step.

    Args:
        owner: The class whose ``step`` it is, for the message.
        batch: What ``step`` was given.
        when: Appended to the message (``" at an update step"``).
    """
    if batch is None:
        raise ValueError(
            f"{owner}.step needs batch=(inputs, targets){when}: the mini-batch whose curvature it uses, "
            "e.g. optimizer.step(batch=(x, y))"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"{owner}.step(batch=...) must be an (inputs, targets) pair, got {type(batch).__name__}"
        )
    inputs, targets = batch
    if not isinstance(targets, Tensor):
        raise ValueError(
            f"{owner}.step(batch=...): the targets must be a tensor, got {type(targets).__name__}"
        )
    return inputs, targets


def by_group(
    items: Sequence[T], group_of: Callable[[T], dict[str, Any]]
) -> list[tuple[dict[str, Any], list[T]]]:
    """``items`` by parameter group (``group_of(item)``), groups and items in their first order.

    For steps fused over a group's parameters (``torch._foreach_*`` with the
    group's hyper-parameters).
    """
    groups: dict[int, tuple[dict[str, Any], list[T]]] = {}
    for item in items:
        group = group_of(item)
        groups.setdefault(id(group), (group, []))[1].append(item)
    return list(groups.values())


def loss_at(problem: Problem, delta: Tensor | None = None) -> Tensor:
    """The batch's loss at ``theta + delta``, ``theta`` without ``delta`` (one forward pass, no graph).

    ``problem`` is a batch's (:meth:`CurvatureOptimizer.batch_problem`), ``theta``
    its parameters, ``delta`` flat in its layout; the model is not modified.
    """
    params = [p.detach() for p in problem.params]
    with torch.no_grad():
        if delta is not None:
            params = [p + d for p, d in zip(params, problem.layout.unflatten(delta))]
        return problem.data_mean(lambda inputs, targets: problem.loss_terms(params, inputs, targets))


def levenberg_marquardt(
    damping: float,
    ratio: float,
    *,
    lower: float,
    upper: float,
    factor: float | tuple[float, float],
    bounds: tuple[float | None, float | None] | None = None,
) -> float:
    """The damping after a step of reduction ratio ``ratio``, by the Levenberg-Marquardt rule.

    ``ratio`` is the actual decrease of the loss over the decrease its quadratic
    model predicted. Below ``lower`` the model overpromised and the damping
    grows (pass ``-inf`` for a step counted as bad whatever its ratio); above
    ``upper`` it shrinks; otherwise, a NaN ratio included, it is kept. J.
    Martens, "Deep learning via Hessian-free optimization", ICML 2010, sec. 4.1
    (thresholds 1/4 and 3/4, factors 3/2 and 2/3); J. Martens and R. Grosse,
    "Optimizing neural networks with Kronecker-factored approximate curvature",
    ICML 2015, sec. 6.5 (a factor ``omega < 1``).

    Args:
        damping: The damping the step was taken with.
        ratio: The step's reduction ratio.
        lower: The ratio below which the damping grows.
        upper: The ratio above which it shrinks.
        factor: A number ``> 1``, which multiplies the damping to grow it and
            divides it to shrink it; a number ``< 1`` (Martens and Grosse's
            ``omega``), which divides it to grow it and multiplies it to shrink it;
            or a pair ``(grow, shrink)`` of the numbers that multiply it. The
            number given is used as it is, never its (rounded) reciprocal.
        bounds: ``(low, high)``, either ``None``: a shrinking damping stops at
            ``low``, a growing one at ``high``.

    Example:
        >>> levenberg_marquardt(1.0, 0.1, lower=0.25, upper=0.75, factor=1.5)
        1.5
        >>> levenberg_marquardt(1.0, 0.9, lower=0.25, upper=0.75, factor=1.5, bounds=(0.8, None))
        0.8
    """
    low, high = (None, None) if bounds is None else bounds
    if ratio < lower:
        if isinstance(factor, tuple):
            damping = damping * factor[0]
        else:
            damping = damping * factor if factor > 1 else damping / factor
        return damping if high is None else min(damping, high)
    if ratio > upper:
        if isinstance(factor, tuple):
            damping = damping * factor[1]
        else:
            damping = damping / factor if factor > 1 else damping * factor
        return damping if low is None else max(damping, low)
    return damping


def warn_if_data_parallel(owner: object) -> None:
    """Warns that ``owner``'s curvature is this process's alone, in a data-parallel run.

    Called where an optimizer (or :class:`~curvkit.optim.CurvaturePreconditioner`)
    measures curvature on its mini-batch: the batch's problem, Hutchinson's
    products through the gradient's graph, NewtonSummary's summary batch. Under
    :class:`torch.nn.parallel.DistributedDataParallel` the gradients are averaged
    over the processes but such curvature is not, so the processes' steps, and
    then their parameters, differ. (Shampoo, whose statistics come from the
    averaged gradients, does not call it.) Python shows the warning once per
    calling line.
    """
    if is_data_parallel():
        warnings.warn(
            f"{type(owner).__name__} measures curvature on this process's mini-batch only; in a "
            "data-parallel run (DistributedDataParallel) the processes' steps and parameters will differ",
            CurvkitWarning,
            stacklevel=3,
        )


def mode_dependent_modules(model: nn.Module) -> list[str]:
    """``"BatchNorm1d '1'"``, ...: the modules of ``model`` in training mode whose output depends on the mode.

    Normalisation layers that keep running statistics (BatchNorm, InstanceNorm
    with ``track_running_stats``: batch statistics in training mode, the running
    ones in evaluation mode), dropout with ``p > 0`` and attention with
    ``dropout > 0``. In evaluation mode (or where none is in training mode)
    the model is the same function in both modes.
    """
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if (
            (isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats)
            or (isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0)
            or (isinstance(module, nn.MultiheadAttention) and module.dropout > 0)
        ):
            found.append(f"{type(module).__name__} {name!r}")
    return found


def full_precision(device: torch.device) -> torch.autocast:
    """A context without the caller's ``torch.autocast`` on ``device``'s type, for a step's curvature.

    A training script may run its whole iteration inside
    ``torch.autocast("cpu", dtype=torch.bfloat16)``, the optimizer's step
    included; a second-order step is then the parameters' dtype's all the
    same: its forward passes, curvature (Kronecker factors, products),
    solves and updates (in bfloat16, K-FAC's factors were singular to working
    precision at any usual damping). The user's own forward and backward
    passes, and a closure, keep their autocast.
    """
    return torch.autocast(device.type, enabled=False)


def check_positive(name: str, value: Any, *, zero: bool = False) -> float:
    """``value`` as a float if it is a finite number ``> 0`` (``>= 0`` with ``zero``), else a ValueError.

    :func:`curvkit.arguments.positive_number` (:func:`~curvkit.arguments.non_negative_number`).
    """
    check = non_negative_number if zero else positive_number
    return check(value, name, error=ValueError)


def check_learning_rate(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number ``>= 0``, else a ValueError: every optimizer's ``lr``.

    Zero is a learning rate, as in :mod:`torch.optim`: the schedulers reach it
    (``CosineAnnealingLR``'s default ``eta_min=0``, a ``LambdaLR`` or
    ``LinearLR`` warm-up from 0), a step with it moves nothing, and a checkpoint
    saved then loads.
    """
    return check_positive(name, value, zero=True)


def check_fraction(name: str, value: Any, *, below_one: bool = False) -> float:
    """``value`` as a float if it is in ``[0, 1]`` (``[0, 1)`` with ``below_one``), else a ValueError.

    :func:`curvkit.arguments.fraction`.
    """
    return fraction(value, name, below_one=below_one, error=ValueError)


def check_integer(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer ``>= minimum``, else a ValueError.

    :func:`curvkit.arguments.integer`.
    """
    return integer(value, name, minimum=minimum, error=ValueError)


def check_seed(name: str, value: Any) -> int:
    """``value`` as an int if it is an integer in ``[0, 2**63)``, else a ValueError.

    :func:`curvkit.arguments.seed`.
    """
    return seed(value, name, error=ValueError)


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``, else a ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_betas(name: str, value: Any, *, second_below_one: bool = True) -> tuple[float, float]:
    """``(beta1, beta2)`` as floats, each in ``[0, 1)`` (``beta2`` in ``[0, 1]`` if not ``second_below_one``).

    Raises:
        ValueError: Not a pair, or a value out of range.
    """
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (
        check_fraction(f"{name}[0]", value[0], below_one=True),
        check_fraction(f"{name}[1]", value[1], below_one=second_below_one),
    )


def optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``check`` that lets ``None`` through (a hyper-parameter that may be switched off)."""

    def checked(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return checked


def floating_tensors(name: str, params: Any) -> Any:
    """``params`` if every one is a real floating-point tensor, else a ValueError (a ``"params"`` check)."""
    for p in params:
        if not p.is_floating_point():
            raise ValueError(f"the optimizer takes real floating-point tensors, got one of dtype {p.dtype}")
    return params


def check_entries(owner: str, state: Mapping[str, Any], keys: Iterable[str]) -> None:
    """A ValueError if the extra state ``state`` of a ``owner`` state dict lacks one of ``keys``."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"not a {owner} state_dict: its 'curvkit' entry lacks {', '.join(missing)}")


def check_model_and_loss(owner: str, model: Any, loss_fn: Any) -> None:
    """A ValueError naming ``owner`` if ``model`` or ``loss_fn`` is ``None``: a batch's problem needs both."""
    if model is None or loss_fn is None:
        raise ValueError(
            f"{owner} needs model= and loss_fn= (the network and its loss, as curvkit.Problem takes it)"
        )


def check_estimator_options(owner: type, spec: EstimatorSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``owner``'s constructor passes to estimator ``spec`` (``**estimator_options``), checked.

    Such a constructor takes any keyword, so a misspelt hyper-parameter of its
    own (``weight_decy=1e-4``) lands among the estimator's options: the error
    says so, listing what is accepted: ``owner``'s own arguments and the
    estimator's options, with the closest name. Otherwise
    :func:`curvkit.registry.check_options` (a ``seed`` included).

    Args:
        owner: The class whose constructor was called (``KFAC``, ``CurvaturePreconditioner``).
        spec: The estimator.
        options: The keywords the constructor did not take itself.

    Returns:
        The options, as :func:`~curvkit.registry.check_options` returns them.

    Raises:
        UnknownOptionError: An option neither ``owner`` nor the estimator takes (one
            line: ``"KFAC takes no argument 'weight_decy' (did you mean 'weight_decay'?):
            its arguments are ...; the options of estimator 'kfac' are ..."``).
        CurvkitError: An invalid ``seed``.
    """
    known = estimator_options(spec)
    unknown = [key for key in options if known is not None and key not in known]
    if unknown:
        assert known is not None
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        parameters = list(inspect.signature(owner.__init__).parameters.values())[1:]  # after self
        own = [p.name for p in parameters if p.kind in named]
        close = difflib.get_close_matches(unknown[0], [*own, *known], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        names, plural = ", ".join(map(repr, unknown)), "s" if len(unknown) > 1 else ""
        theirs = ", ".join(known) if known else "none"
        raise UnknownOptionError(
            f"{owner.__name__} takes no argument{plural} {names}{hint}: its arguments are "
            f"{', '.join(own)}; the options of estimator {spec.name!r} are {theirs}"
        )
    return check_options(spec, options)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class of curvkit's optimizers (see the module docstring).

    Args:
        params: Parameters or parameter groups, as :class:`torch.optim.Optimizer` takes them.
        defaults: Per-group defaults.
        model: The network, for optimizers that use a curvature estimator.
        loss_fn: Its loss, as :class:`curvkit.Problem` takes it (``"cross_entropy"``,
            ``"mse"``, a loss module, or ``(outputs, targets) -> mean loss``).
        eval_mode: Whether the curvature (and a loss and gradient the step
            computes) is that of the model in evaluation mode (dropout off,
            BatchNorm's running statistics, which no step updates), as the
            analyses use; :meth:`warn_if_trained_in_eval_mode` warns about a
            model left in training mode.

    Attributes:
        skipped_steps: Steps whose update was not finite, hence not applied.
    """

    GLOBAL: tuple[str, ...] = ()
    """Hyper-parameters of the whole optimizer (a joint solve, a schedule, a seed): a parameter group may
    not set them (it would be ignored), at construction, :meth:`add_param_group` or
    :meth:`load_state_dict`."""

    GROUP_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {}
    """Hyper-parameters a group may set (and ``"params"``), each with its check ``check(name, value)``,
    run on every group: it returns the value the group keeps, or raises a one-line ValueError."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        loss_fn: Any = None,
        eval_mode: bool = True,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None:
            resolve_loss(loss_fn)  # a loss every batch's Problem would refuse: refused now, in one line
        self.model = model
        self.loss_fn = loss_fn
        self.eval_mode = eval_mode
        self.skipped_steps = 0
        self._warned_eval_mode = False  # warn_if_trained_in_eval_mode warns once per optimizer
        self._group_keys = tuple(defaults)
        """The hyper-parameters every group has: the constructor's defaults (torch adds keys of its own
        to :attr:`defaults`, ``"differentiable"`` when a state dict is loaded, that no saved group has)."""
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group: refuses one that sets a :attr:`GLOBAL` hyper-parameter, checks :attr:`GROUP_CHECKS`.

        Every entry of :attr:`GROUP_CHECKS` runs on the group (its defaults
        filled in) and the group keeps the value it returns (``betas`` as a
        tuple of floats, say). A group that fails, or has no parameter, is not
        added.

        Raises:
            ValueError: Naming the group and the hyper-parameter, or the empty group.
        """
        index = len(self.param_groups)
        self._refuse_global(param_group, index)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["params"]:
            self.param_groups.pop()
            raise ValueError(f"parameter group {index} is empty")
        try:
            self._check_group(group, index, self.GROUP_CHECKS)
        except ValueError:
            self.param_groups.pop()
            raise

    def _refuse_global(self, group: Mapping[str, Any], index: int) -> None:
        """A ValueError if parameter group ``index`` sets a :attr:`GLOBAL` hyper-parameter."""
        shared = [name for name in self.GLOBAL if name in group]
        if shared:
            per_group = ", ".join(sorted(self._group_keys)) or "no hyper-parameter"
            names, verb = ", ".join(shared), "applies" if len(shared) == 1 else "apply"
            raise ValueError(
                f"parameter group {index}: {type(self).__name__} takes only {per_group} per parameter group: "
                f"{names} {verb} to the whole optimizer; pass {'it' if len(shared) == 1 else 'them'} to the "
                "constructor"
            )

    @staticmethod
    def _check_group(
        group: dict[str, Any], index: int, checks: Mapping[str, Callable[[str, Any], Any]]
    ) -> None:
        """Runs ``checks`` on parameter group ``index``, which keeps their values; a ValueError naming it."""
        try:
            for name, check in checks.items():
                group[name] = check(name, group[name])
        except ValueError as exc:
            raise ValueError(f"parameter group {index}: {exc}") from None

    # ------------------------------------------------------------------ the batch's problem
    def parameter_names(self) -> list[str]:
        """The model's names of the optimized tensors, in the order of the parameter groups.

        The one check that every optimized tensor is a parameter of the model:
        optimizers that need the model call it at construction, and
        :meth:`batch_problem` at every step. The names are those of the
        :class:`curvkit.Problem` of a batch: a ``torch.compile``'d model's
        are its original module's (:func:`curvkit.compiled.original_module`).

        Raises:
            ValueError: The optimizer was built without ``model=`` or ``loss_fn=``
                (:func:`check_model_and_loss`), or optimizes a tensor that is not a
                parameter of the model (counted, with the first shapes).
        """
        check_model_and_loss(type(self).__name__, self.model, self.loss_fn)
        assert self.model is not None
        names = {id(p): name for name, p in original_module(self.model).named_parameters()}
        mine = [p for group in self.param_groups for p in group["params"]]
        missing = [p for p in mine if id(p) not in names]
        if missing:
            shapes = [tuple(p.shape) for p in missing[:3]]
            raise ValueError(
                f"{len(missing)} optimized tensor(s) (shapes {shapes}) are not parameters of the model"
            )
        return [names[id(p)] for p in mine]

    def batch_problem(self, inputs: Any, targets: Any) -> Problem:
        """The :class:`curvkit.Problem` of one mini-batch over this optimizer's trainable parameters.

        The optimized tensors that require grad now: a frozen one
        (``requires_grad=False``) is left out, so that the step leaves it as
        :mod:`torch.optim` does (its ``.grad`` stays ``None``), and is back once
        unfrozen.

        Raises:
            ValueError: As :meth:`parameter_names`, or no optimized tensor requires grad.
        """
        names = self.parameter_names()
        mine = [p for group in self.param_groups for p in group["params"]]
        params = [name for name, p in zip(names, mine) if p.requires_grad]
        if not params:
            raise ValueError(
                f"{type(self).__name__}: none of the optimized parameters requires grad (all are frozen): "
                "there is nothing to step"
            )
        assert self.model is not None
        warn_if_data_parallel(self)
        return Problem.for_batch(
            self.model, self.loss_fn, inputs, targets, params=params, eval_mode=self.eval_mode
        )

    def full_precision(self) -> torch.autocast:
        """:func:`full_precision` on the optimizer's device (its first parameter's): a step's curvature
        in the parameters' dtype whatever ``torch.autocast`` the step is called in."""
        return full_precision(self.param_groups[0]["params"][0].device)

    def warn_if_trained_in_eval_mode(self, *, stacklevel: int = 4) -> None:
        """Warns once if this step's loss and gradient come from a mode the model is not in.

        Called by an optimizer that computes the batch's loss and gradient itself
        (Newton, HessianFree, NaturalGradient; KFAC and EKFAC without ``.grad``),
        before it does. With ``eval_mode=True`` they are the model's in evaluation
        mode: a model in training mode whose BatchNorm or dropout layers
        (:func:`mode_dependent_modules`) behave differently there would
        otherwise be trained, silently, as another function (BatchNorm with its
        running statistics, which the step does not update; no dropout). The
        :class:`curvkit.CurvkitWarning` names those layers and says how to
        proceed; ``model.eval()``, or a model without such layers, gives none.

        Args:
            stacklevel: The warning's, counted from here (4: the caller of a
                ``step`` that calls this method, through torch.optim's wrapper).
        """
        if not self.eval_mode or self._warned_eval_mode or self.model is None:
            return
        found = mode_dependent_modules(original_module(self.model))
        if not found:
            return
        self._warned_eval_mode = True
        shown = ", ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
        warnings.warn(
            f"{type(self).__name__}: the model is in training mode, but with eval_mode=True the step's loss, "
            f"gradient and curvature are those of the model in evaluation mode, where its {shown} behave "
            "differently: BatchNorm normalises with its running statistics, which the step does not update, "
            "and dropout is off. Call model.eval() if that is the model to train (no warning then); see "
            "'Evaluation mode' in docs/optimizers.md for the alternatives",
            CurvkitWarning,
            stacklevel=stacklevel,
        )

    # ------------------------------------------------------------------ closure and updates
    @staticmethod
    def evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
        """The closure's loss, evaluated with gradients enabled (``None`` without a closure)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def apply_updates(
        self,
        updates: Sequence[tuple[Tensor, Tensor]],
        what: str = "update",
        *,
        checks: Sequence[tuple[str, Sequence[Tensor | None]]] = (),
        implied: Collection[str] = (),
        scales: Sequence[float] | None = None,
        unchanged: str = "parameters unchanged",
        stacklevel: int = 4,
    ) -> bool:
        """``p += scale * delta`` for every pair, if every ``delta`` and every tensor of ``checks`` is finite.

        Otherwise nothing is added: :attr:`skipped_steps` counts the step and a
        :class:`curvkit.CurvkitWarning` names the first non-finite thing, in the
        order of ``checks`` and then ``what``. Everything is checked in one
        host-device synchronisation (:func:`all_finite`), and the updates are
        added in one fused call (``torch._foreach_add_``) per run of equal scales.

        Args:
            updates: ``(parameter, delta)`` pairs.
            what: What the deltas are, for the warning.
            checks: ``(name, tensors)`` pairs checked with the updates: what the
                step was computed from (``"gradient"``) and the new state a caller
                keeps only if the step is applied (``"moments"``).
            implied: Names in ``checks``, or ``what``, that are finite whenever the
                rest is (:func:`curvkit.finite.first_non_finite`): not checked on
                their own when all is finite.
            scales: Per pair, a factor of its delta, applied as the fused
                addition's ``alpha`` (one operation fewer than scaling the deltas);
                ``None``: 1. The deltas are checked as they are, so a caller
                passes a scale only where ``scale * delta`` is finite whenever
                ``delta`` is (a bounded delta, such as SophiaH's clipped step),
                and only a number its parameter's dtype can hold (torch refuses
                an ``alpha`` that overflows it).
            unchanged: What the warning says is left as it was.
            stacklevel: The warning's, counted from here (4: the caller of an
                optimizer whose ``step`` calls this method).

        Returns:
            Whether the updates were applied.

        Raises:
            ValueError: ``scales`` does not hold one factor per pair.
        """
        if scales is not None and len(scales) != len(updates):
            raise ValueError(f"apply_updates: {len(scales)} scales for {len(updates)} updates")
        return self._apply_checked(
            [p for p, _ in updates],
            [d for _, d in updates],
            what,
            checks,
            implied=implied,
            scales=scales,
            unchanged=unchanged,
            stacklevel=stacklevel + 1,
        )

    def _apply_checked(
        self,
        params: list[Tensor],
        deltas: list[Tensor],
        what: str,
        checks: Sequence[tuple[str, Sequence[Tensor | None]]],
        *,
        implied: Collection[str],
        scales: Sequence[float] | None,
        unchanged: str,
        stacklevel: int,
    ) -> bool:
        """:meth:`apply_updates` with the parameters and their deltas in two lists (one scale per pair).

        For a step that has them so, without pairing them up and apart again.
        """
        if not self._finite_or_skip([*checks, (what, deltas)], implied, unchanged, stacklevel + 1):
            return False
        if not params:
            return True
        if scales is None or scales.count(scales[0]) == len(scales):  # the usual case: one fused addition
            runs = [(1.0 if scales is None else scales[0], params, deltas)]
        else:  # one per run of equal scales
            runs = []
            for scale, run in itertools.groupby(range(len(params)), key=scales.__getitem__):
                indices = list(run)
                runs.append((scale, [params[i] for i in indices], [deltas[i] for i in indices]))
        # the parameters are leaves that require grad: added outside autograd's record, by the switch
        # torch.no_grad flips (entering its context costs 1.3 us, six times the switch)
        recording = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for scale, run_params, run_deltas in runs:
                torch._foreach_add_(run_params, run_deltas, alpha=scale)
        finally:
            torch._C._set_grad_enabled(recording)
        return True

    def apply_values(
        self,
        values: Sequence[tuple[Tensor, Tensor]],
        what: str = "update",
        *,
        checks: Sequence[tuple[str, Sequence[Tensor | None]]] = (),
        unchanged: str = "parameters unchanged",
        stacklevel: int = 4,
    ) -> bool:
        """``p <- value`` for every pair, if every value and every tensor of ``checks`` is finite.

        :meth:`apply_updates` for a step formed as the new values themselves
        (``p - lr u`` in one rounding, as ``p.add_(u, alpha=-lr)``): what is
        checked is what the parameters become, so an addition that overflows the
        dtype (``p + delta`` beyond its range, both finite) skips the step too.
        Otherwise the same: one check, a :class:`curvkit.CurvkitWarning` naming
        the first non-finite thing, :attr:`skipped_steps` counted.

        Returns:
            Whether the values were applied.
        """
        new = [v for _, v in values]
        if not self._finite_or_skip([*checks, (what, new)], (), unchanged, stacklevel + 1):
            return False
        with outside_autograd():
            torch._foreach_copy_([p for p, _ in values], new)
        return True

    def _finite_or_skip(
        self,
        checks: Sequence[tuple[str, Sequence[Tensor | None]]],
        implied: Collection[str],
        unchanged: str,
        stacklevel: int,
    ) -> bool:
        """Whether everything in ``checks`` is finite; if not, :meth:`skip` names the first culprit."""
        why = first_non_finite(checks, implied)
        if why is not None:
            self.skip(f"the {why} is not finite", unchanged=unchanged, stacklevel=stacklevel + 1)
        return why is None

    def skip(self, why: str, *, unchanged: str = "parameters unchanged", stacklevel: int = 4) -> None:
        """Counts a skipped step in :attr:`skipped_steps` and warns ``"<class>: step skipped: <why>"``.

        Args:
            why: The reason (``"the gradient is not finite"``).
            unchanged: What is left as it was, said in parentheses.
            stacklevel: The warning's, counted from here (4: the caller of a
                ``step`` that calls this method, through torch.optim's wrapper).
        """
        self.skipped_steps += 1
        warnings.warn(
            f"{type(self).__name__}: step skipped: {why} ({unchanged})", CurvkitWarning, stacklevel=stacklevel
        )

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        """What a subclass keeps outside the per-parameter state (plain data or tensors)."""
        return {}

    def check_extra_state(self, state: dict[str, Any]) -> None:
        """Refuses :meth:`extra_state` that :meth:`load_extra_state` could not restore, changing nothing.

        Called by :meth:`load_state_dict` before anything is loaded, so that a
        refused state dict leaves the optimizer as it was.

        Raises:
            ValueError: Saying what is missing or invalid.
        """

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`extra_state` (checked by :meth:`check_extra_state`)."""

    @classmethod
    def state_kind(cls) -> str:
        """The kind of state this optimizer writes and reads: the name of its class in ``curvkit.optim``.

        A subclass made elsewhere (``class MyKFAC(KFAC)``) has the kind of the
        nearest ``curvkit.optim`` optimizer it derives from, so that it and that
        optimizer load each other's state; one deriving from
        :class:`CurvatureOptimizer` itself has its own class's name.
        """
        return next(
            (
                k.__name__
                for k in cls.__mro__
                if k.__module__.startswith("curvkit.optim.") and k is not CurvatureOptimizer
            ),
            cls.__name__,
        )

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state, with the optimizer's kind, :meth:`extra_state` and the skipped steps.

        Those are under ``"curvkit"``; the kind is :meth:`state_kind` (``"KFAC"``).
        """
        state = super().state_dict()
        state["curvkit"] = {
            "kind": self.state_kind(),
            "skipped_steps": self.skipped_steps,
            "shapes": [[list(p.shape) for p in group["params"]] for group in self.param_groups],
            **self.extra_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`, or refuses it and leaves the optimizer as it was.

        Everything is checked before anything is loaded: the kind of optimizer
        that wrote it (a state dict without one, written before kinds were
        kept, is accepted), its parameter groups (no :attr:`GLOBAL` setting,
        every per-group hyper-parameter there and passing :attr:`GROUP_CHECKS`,
        whose values the groups keep) and :meth:`check_extra_state`; then
        ``torch.optim``'s loader (which checks the groups' sizes first) and
        :meth:`load_extra_state`.

        Raises:
            ValueError: A state dict not written by this kind of optimizer, or
                with an invalid group or extra state.
        """
        name = type(self).__name__
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvkit", None)
        if extra is None:
            raise ValueError(f"not a {name} state_dict: it has no 'curvkit' entry")
        extra = dict(extra)
        kind = extra.pop("kind", None)
        if kind is not None and kind != self.state_kind():
            raise ValueError(f"this state_dict was written by {kind}, not by {self.state_kind()}: not loaded")
        skipped = check_integer("skipped_steps", extra.pop("skipped_steps", 0), minimum=0)
        state_dict["param_groups"] = self._checked_groups(state_dict.get("param_groups"))
        self._check_shapes(extra.pop("shapes", None))
        self.check_extra_state(extra)
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped
        self.load_extra_state(extra)

    def _check_shapes(self, shapes: Any) -> None:
        """A ValueError if the state dict's parameters (``shapes``, by group) are not this optimizer's.

        :mod:`torch.optim` matches the saved state to the parameters by position,
        so an optimizer built over other parameters, or the same in another order,
        would get another tensor's state: a step then fails on a shape or, where
        shapes broadcast, goes on wrong. ``None`` (a state dict written before the
        shapes were kept) passes; groups of other sizes are left to torch.optim's
        check, which names them.
        """
        if shapes is None:
            return
        name = type(self).__name__
        try:
            saved = [[tuple(int(n) for n in shape) for shape in group] for group in shapes]
        except (TypeError, ValueError):
            raise ValueError(
                f"not a {name} state_dict: its 'shapes' entry is not a list of shapes per group"
            ) from None
        mine = [[tuple(p.shape) for p in group["params"]] for group in self.param_groups]
        if [len(group) for group in saved] != [len(group) for group in mine]:
            return
        for g, (theirs, ours) in enumerate(zip(saved, mine)):
            for i, (before, now) in enumerate(zip(theirs, ours)):
                if before != now:
                    raise ValueError(
                        f"{name}.load_state_dict: parameter {i} of group {g} has shape {now} here but "
                        f"{before} in the state dict: build the optimizer over the parameters it was saved "
                        "for, in the same order"
                    )

    def _checked_groups(self, groups: Any) -> list[dict[str, Any]]:
        """Copies of a state dict's parameter groups, checked as :meth:`add_param_group` checks a group.

        Raises:
            ValueError: Not a list of groups, or a group that sets a :attr:`GLOBAL`
                setting, lacks a per-group hyper-parameter or fails its check.
        """
        name = type(self).__name__
        if not isinstance(groups, list) or not all(isinstance(group, Mapping) for group in groups):
            raise ValueError(f"not a {name} state_dict: its 'param_groups' is not a list of groups")
        checks = {key: check for key, check in self.GROUP_CHECKS.items() if key != "params"}
        checked = []
        try:
            for index, saved in enumerate(groups):
                group = dict(saved)
                self._refuse_global(group, index)
                missing = [key for key in self._group_keys if key not in group]
                if missing:
                    raise ValueError(f"parameter group {index} lacks {', '.join(missing)}")
                self._check_group(group, index, checks)
                checked.append(group)
        except ValueError as exc:
            raise ValueError(f"{name}.load_state_dict: the state dict's {exc}") from None
        return checked
