"""The plugin manager, the estimator registry and the plugins' checkpoint loaders.

Built-in estimators live in the ``curvkit.plugins`` package and are registered
by module name from :data:`BUILTIN_PLUGINS`, on the same hooks a third-party
plugin uses (:mod:`curvkit.hookspecs`). Third-party plugins come from the
``curvkit`` entry-point group. The core never imports the built-ins directly.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from curvkit import hookspecs
from curvkit.checkpoints._types import CheckpointLoader
from curvkit.checkpoints.builtin import BUILTIN_LOADERS
from curvkit.errors import DuplicateEstimatorError, PluginError, UnknownEstimatorError, UnknownOptionError
from curvkit.estimator_spec import EstimatorSpec
from curvkit.operator import CurvatureOperator

__all__ = [
    "BUILTIN_PLUGINS",
    "EstimatorSpec",
    "PluginInfo",
    "checkpoint_loaders",
    "curvature",
    "estimators",
    "get_estimator",
    "plugin_manager",
    "loaded_plugins",
    "register_plugin",
    "unregister_plugin",
]

BUILTIN_PLUGINS: tuple[str, ...] = ("curvkit.plugins.hessian",)
ENTRY_POINT_GROUP = "curvkit"


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, distribution version, estimator and checkpoint-loader names."""

    name: str
    version: str
    builtin: bool
    estimators: tuple[str, ...]
    checkpoint_loaders: tuple[str, ...] = ()


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        for module_name in BUILTIN_PLUGINS:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise PluginError(
                    f"built-in plugin {module_name} cannot be imported ({exc}); reinstall curvkit"
                ) from exc
            self.pm.register(module, name=module_name)
        if not os.environ.get("CURVKIT_DISABLE_PLUGIN_AUTOLOAD"):
            try:
                self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            except Exception as exc:  # a broken third-party plugin
                detail = " ".join(str(exc).split())  # one line, for the command line
                raise PluginError(f"a curvkit plugin failed to load: {type(exc).__name__}: {detail}") from exc
        if os.environ.get("CURVKIT_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        self._check()
        self._specs: dict[str, EstimatorSpec] | None = None
        self._loaders: list[CheckpointLoader] | None = None

    def _check(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{exc}; hooks are listed in curvkit.hookspecs") from exc

    def _collect(
        self,
        hook_name: str,
        item_type: type,
        what: str,
        *,
        last_first: bool = False,
        reserved: Collection[str] = (),
        duplicate_error: type[PluginError] = PluginError,
    ) -> dict[str, Any]:
        """Named items returned by every implementation of a hook, attributed to their plugin.

        Items must be ``item_type`` instances with ``name`` and ``plugin`` fields;
        a name in ``reserved`` or registered twice is an error naming the plugins.
        """
        items: dict[str, Any] = {}
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()  # registration order
        for impl in reversed(impls) if last_first else impls:
            for item in impl.function() or []:
                if not isinstance(item, item_type):
                    raise PluginError(
                        f"plugin {impl.plugin_name} returned {type(item).__name__} from "
                        f"{hook_name}; return curvkit.{item_type.__name__} objects"
                    )
                item.plugin = impl.plugin_name
                if item.name in reserved:
                    raise PluginError(
                        f"{what} {item.name!r} of plugin {item.plugin!r} has the name of "
                        "a built-in format; rename it"
                    )
                if item.name in items:
                    raise duplicate_error(
                        f"{what} {item.name!r} is registered by both plugin "
                        f"{items[item.name].plugin!r} and plugin {item.plugin!r}; "
                        "uninstall or rename one"
                    )
                items[item.name] = item
        return items

    def specs(self) -> dict[str, EstimatorSpec]:
        if self._specs is None:
            self._specs = self._collect(
                "curvkit_register_estimators",
                EstimatorSpec,
                "estimator",
                duplicate_error=DuplicateEstimatorError,
            )
        return self._specs

    def loaders(self) -> list[CheckpointLoader]:
        if self._loaders is None:
            loaders = self._collect(
                "curvkit_checkpoint_loaders",
                CheckpointLoader,
                "checkpoint loader",
                last_first=True,  # the plugin registered last is asked first
                reserved={loader.name for loader in BUILTIN_LOADERS},
            )
            self._loaders = list(loaders.values())
        return self._loaders

    def plugin_infos(self) -> list[PluginInfo]:
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        from curvkit._version import __version__

        by_plugin: dict[str, list[str]] = {}
        for spec in self.specs().values():
            by_plugin.setdefault(spec.plugin, []).append(spec.name)
        loaders_by_plugin: dict[str, list[str]] = {}
        for loader in self.loaders():
            loaders_by_plugin.setdefault(loader.plugin, []).append(loader.name)
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            builtin = name in BUILTIN_PLUGINS
            dist = dists.get(id(plugin))
            version = __version__ if builtin else (dist.version if dist is not None else "")
            infos.append(
                PluginInfo(
                    name,
                    version,
                    builtin,
                    tuple(by_plugin.get(name, ())),
                    tuple(loaders_by_plugin.get(name, ())),
                )
            )
        return infos


_REGISTRY: _Registry | None = None


def _registry() -> _Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _Registry()
    return _REGISTRY


def plugin_manager() -> pluggy.PluginManager:
    """The :class:`pluggy.PluginManager` behind curvkit (built on first use)."""
    return _registry().pm


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object or module at run time; returns its name.

    Useful in scripts and tests; installed packages use the ``curvkit``
    entry-point group instead.

    Raises:
        PluginError: The plugin implements an unknown hook, or registers a
            checkpoint loader whose name is taken.
        DuplicateEstimatorError: It registers an estimator name already taken.
    """
    reg = _registry()
    try:
        plugin_name = reg.pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:  # already registered / bad signature
        raise PluginError(" ".join(str(exc).split())) from exc
    try:
        reg._check()
        reg._specs, reg._loaders = None, None
        reg.specs()
        reg.loaders()
    except Exception:
        reg.pm.unregister(plugin)
        reg._specs, reg._loaders = None, None
        raise
    return plugin_name or ""


def unregister_plugin(plugin: object | None = None, name: str | None = None) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    reg = _registry()
    reg.pm.unregister(plugin, name=name)
    reg._specs, reg._loaders = None, None


def estimators() -> list[EstimatorSpec]:
    """Every registered estimator, sorted by name."""
    return sorted(_registry().specs().values(), key=lambda s: s.name)


def loaded_plugins() -> list[PluginInfo]:
    """Every loaded plugin with its version and the estimators and checkpoint loaders it registers."""
    return _registry().plugin_infos()


def checkpoint_loaders() -> list[CheckpointLoader]:
    """The checkpoint loaders registered by plugins, in the order they are asked.

    The plugin registered last is asked first. The built-in formats
    (:data:`curvkit.checkpoints.BUILTIN_LOADERS`) are not included: they are
    asked after these; :func:`curvkit.checkpoints.checkpoint_formats` lists all.

    Raises:
        PluginError: A plugin returns something other than
            :class:`~curvkit.checkpoints.CheckpointLoader`, or two loaders (or a
            loader and a built-in format) share a name.
    """
    return list(_registry().loaders())


def get_estimator(name: str) -> EstimatorSpec:
    """The spec of the estimator called ``name``.

    Raises:
        UnknownEstimatorError: No estimator has that name (the message lists them).
    """
    specs = _registry().specs()
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownEstimatorError(
            f"unknown estimator {name!r}; {hint}available: {', '.join(sorted(specs))}"
        )
    return specs[name]


def curvature(name: str, problem: Any, **options: Any) -> CurvatureOperator:
    """The curvature operator of a registered estimator for a problem.

    Args:
        name: A registered estimator name (see :func:`estimators`).
        problem: The :class:`~curvkit.Problem`.
        **options: Passed to the estimator's factory.

    Example:
        >>> import torch, curvkit
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.zeros(2, 1)
        >>> H = curvkit.curvature("hessian", curvkit.Problem(model, "mse", (X, y)))
        >>> H @ torch.tensor([1.0, 1.0])   # H = 2/N X^T X = diag(1, 4)
        tensor([1., 4.])
    """
    spec = get_estimator(name)
    check_options(spec, options)
    op = spec.factory(problem, **options)
    if not isinstance(op, CurvatureOperator):
        raise PluginError(
            f"estimator {name!r} of plugin {spec.plugin!r} returned {type(op).__name__}, "
            "not a curvkit.CurvatureOperator"
        )
    op.name = name
    return op


def estimator_options(spec: EstimatorSpec) -> list[str] | None:
    """The keyword options an estimator's factory takes (``None``: any, it takes ``**kwargs``)."""
    try:
        parameters = list(inspect.signature(spec.factory).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: let it decide
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters[1:] if p.kind in named]


def check_options(spec: EstimatorSpec, options: Mapping[str, Any]) -> None:
    """Refuse options the estimator does not take, listing those it does.

    Raises:
        UnknownOptionError: An option the factory's signature does not name.
    """
    known = estimator_options(spec)
    unknown = [key for key in options if known is not None and key not in known]
    if unknown:
        takes = f"its options: {', '.join(known)}" if known else "it takes no options"
        raise UnknownOptionError(
            f"estimator {spec.name!r} takes no option {', '.join(map(repr, unknown))}; {takes}"
        )
