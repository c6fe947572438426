"""Model factories: resolving ``"module:attr"``, which ones a checkpoint may name, building the model."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from curvkit.checkpoints._text import exc_line, listing
from curvkit.checkpoints._types import CheckpointError
from curvkit.checkpoints.unpack import CheckpointContent
from curvkit.errors import one_line

__all__ = ["resolve_factory", "trusted_factory"]

_TRUSTED_FACTORY_MODULES = ("curvkit.models",)
_FACTORY_MARK = "__curvkit_model_factory__"
_F = TypeVar("_F", bound=Callable[..., Any])


def trusted_factory(fn: _F) -> _F:
    """Mark a function as a model factory that checkpoint metadata may name.

    :func:`load_checkpoint` calls a factory named by a checkpoint's metadata only
    if it is an ``nn.Module`` subclass or a function marked with this decorator
    (or one of curvkit's own, in ``curvkit.models``): calling an arbitrary
    function named by a file would let the file run code (``torch.hub:load``).
    A factory the user names (``--model``) is always called.

    Example:
        >>> from curvkit.checkpoints import trusted_factory
        >>> @trusted_factory
        ... def mlp(hidden: int = 8):
        ...     import torch
        ...     return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh())
        >>> mlp.__curvkit_model_factory__
        True
    """
    setattr(fn, _FACTORY_MARK, True)
    return fn


def is_trusted_factory(obj: object) -> bool:
    """Whether checkpoint metadata may name ``obj``: a module class or a marked function."""
    if isinstance(obj, type):
        return issubclass(obj, nn.Module)
    if not inspect.isfunction(obj):
        return False
    return obj.__dict__.get(_FACTORY_MARK) is True or obj.__module__ in _TRUSTED_FACTORY_MODULES


def check_factory_spec(spec: object) -> tuple[str, str]:
    """``(module, attribute)`` of a ``"module:attr"`` spec, or a CheckpointError."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise CheckpointError(
            f"a model factory is given as 'module:attribute' (e.g. 'mypackage.models:MLP'), got {spec!r}"
        )
    module_name, attr = spec.split(":")
    parts = module_name.split(".") + attr.split(".")
    if not all(p.isidentifier() for p in parts):
        raise CheckpointError(
            f"model factory {spec!r} is not 'module:attribute' with dotted Python names "
            "(e.g. 'mypackage.models:MLP' or 'mypackage.models:Nets.small')"
        )
    return module_name, attr


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``"module:attr"`` (``attr`` may be dotted).

    Args:
        spec: e.g. ``"torch.nn:Linear"`` or ``"mypackage.models:Zoo.small"``.

    Returns:
        The object, which is callable.

    Raises:
        CheckpointError: The spec is malformed, the module cannot be imported, it
            has no such attribute, or the attribute is not callable.

    Example:
        >>> from curvkit.checkpoints import resolve_factory
        >>> resolve_factory("torch.nn:Linear")
        <class 'torch.nn.modules.linear.Linear'>
    """
    module_name, attr = check_factory_spec(spec)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(
            f"cannot import module {module_name!r} of model factory {spec!r} ({exc_line(exc)}); "
            "install its package or add its folder to PYTHONPATH"
        ) from exc
    except Exception as exc:  # the module itself fails while importing
        raise CheckpointError(
            f"importing module {module_name!r} of model factory {spec!r} failed ({exc_line(exc)}); "
            "fix that module"
        ) from exc
    owner = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; check the name"
            raise CheckpointError(f"{owner!r} has no attribute {part!r} (model factory {spec!r}){hint}")
        obj = getattr(obj, part)
        owner = f"{owner}.{part}" if owner != module_name else f"{module_name}:{part}"
    if not callable(obj):
        raise CheckpointError(f"model factory {spec!r} is a {type(obj).__name__}, not a class or function")
    return obj


def kwargs_accepted(factory: Callable[..., Any], candidates: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``candidates`` that ``factory``'s signature accepts by name."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return dict(candidates)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(candidates)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in candidates.items() if k in names}


def call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], spec: str) -> nn.Module:
    """``factory(**kwargs)``, checked to be an ``nn.Module``; ``spec`` names it in errors."""
    try:
        net = factory(**kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"model factory {spec}(**{one_line(dict(kwargs), 120)}) failed ({exc_line(exc)}); "
            "check --model and --model-kwargs"
        ) from exc
    if not isinstance(net, nn.Module):
        raise CheckpointError(
            f"model factory {spec} returned a {type(net).__name__}, not a torch.nn.Module; "
            "pass a factory that builds the model"
        )
    return net


def build_model(
    content: CheckpointContent,
    path: Path,
    model: nn.Module | None,
    model_factory: str | Callable[..., Any] | None,
    model_kwargs: Mapping[str, Any] | None,
    trust_pickle: bool,
) -> tuple[nn.Module, str, list[str]]:
    """The model to load weights into, a description of it for messages, and notes.

    The first of: ``model``; ``model_factory(**kwargs)``, with ``model_kwargs``,
    else the metadata's kwargs if it names the same factory, else the Lightning
    ``hyper_parameters`` the factory accepts; the metadata's factory, if trusted.
    """
    meta = content.metadata
    if model is not None:
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        return model, f"(the given {type(model).__name__})", []
    if model_factory is not None:
        if isinstance(model_factory, str):
            spec, factory = model_factory, resolve_factory(model_factory)
        elif callable(model_factory):
            spec, factory = getattr(model_factory, "__qualname__", repr(model_factory)), model_factory
        else:
            raise CheckpointError(
                f"model_factory must be 'module:attr' or a callable, got {type(model_factory)}"
            )
        notes = []
        if model_kwargs is not None:
            kwargs = dict(model_kwargs)
        elif meta.get("model_factory") == spec:
            kwargs = dict(meta.get("model_kwargs") or {})
        elif content.hyper_parameters:
            kwargs = kwargs_accepted(factory, content.hyper_parameters)
            notes.append(f"model kwargs from the Lightning hyper_parameters: {listing(kwargs) or 'none'}")
        else:
            kwargs = {}
        return call_factory(factory, kwargs, spec), f"{spec}(**{one_line(kwargs, 120)})", notes
    spec = meta.get("model_factory")
    if spec:
        factory = resolve_factory(spec)
        if not trust_pickle and not is_trusted_factory(factory):
            raise CheckpointError(
                f"{path} names the model factory {spec!r}, a {type(factory).__name__} that is neither an "
                "nn.Module subclass nor marked @curvkit.trusted_factory: calling a function named by a file "
                f"could run arbitrary code; pass --model {spec} to confirm it (or --trust-pickle for files "
                "you trust)"
            )
        kwargs = dict(model_kwargs if model_kwargs is not None else meta.get("model_kwargs") or {})
        return call_factory(factory, kwargs, spec), f"{spec}(**{one_line(kwargs, 120)})", []
    raise CheckpointError(
        f"{path} holds only weights and no curvkit metadata naming the model; pass --model module:factory "
        "(and --model-kwargs JSON), or save checkpoints with curvkit.save_checkpoint"
    )
