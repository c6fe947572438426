"""The plugin manager, the estimator registry and the plugins' checkpoint loaders.

Built-in estimators live in the ``curvkit.plugins`` package and are registered
by module name from :data:`BUILTIN_PLUGINS`, on the same hooks a third-party
plugin uses (:mod:`curvkit.hookspecs`). Third-party plugins come from the
``curvkit`` entry-point group. The core never imports the built-ins directly.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from curvkit import hookspecs
from curvkit.arguments import seed
from curvkit.checkpoints._types import CheckpointLoader
from curvkit.checkpoints.builtin import BUILTIN_LOADERS
from curvkit.errors import (
    CurvkitWarning,
    DuplicateEstimatorError,
    PluginError,
    UnknownEstimatorError,
    UnknownOptionError,
    describe_error,
    one_line,
)
from curvkit.estimator_spec import EstimatorSpec
from curvkit.kind_spec import BUILTIN_KINDS, AnalysisKind
from curvkit.operator import CurvatureOperator
from curvkit.solver_spec import SolverSpec

__all__ = [
    "BUILTIN_PLUGINS",
    "ITEM_KINDS",
    "ItemKind",
    "add_item_kind",
    "items",
    "BrokenPlugin",
    "broken_plugins",
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

BUILTIN_PLUGINS: tuple[str, ...] = (
    "curvkit.plugins.hessian",
    "curvkit.plugins.ggn",
    "curvkit.plugins.fisher",
    "curvkit.plugins.empirical_fisher",
    "curvkit.plugins.kfac",
    "curvkit.plugins.d3",
    "curvkit.plugins.solvers",
)
ENTRY_POINT_GROUP = "curvkit"


@dataclass(frozen=True)
class ItemKind:
    """A kind of item plugins register through a hook: the registry's table has one per hook.

    Attributes:
        hook: The hook's name (its implementations return lists of items).
        item_type: The items' class; it has ``name`` and ``plugin`` fields.
        what: What an item is called in messages (``"estimator"``).
        last_first: Ask the plugin registered last first (the items' order).
        reserved: Names no plugin may use.
        duplicate_error: The error for a name registered twice.
    """

    hook: str
    item_type: type
    what: str
    last_first: bool = False
    reserved: frozenset[str] = frozenset()
    duplicate_error: type[PluginError] = PluginError


ITEM_KINDS: dict[str, ItemKind] = {
    "estimators": ItemKind(
        "curvkit_register_estimators", EstimatorSpec, "estimator", duplicate_error=DuplicateEstimatorError
    ),
    "solvers": ItemKind("curvkit_register_solvers", SolverSpec, "solver"),
    "analysis_kinds": ItemKind(
        "curvkit_register_analysis_kinds", AnalysisKind, "analysis kind", reserved=frozenset(BUILTIN_KINDS)
    ),
    "checkpoint_loaders": ItemKind(
        "curvkit_checkpoint_loaders",
        CheckpointLoader,
        "checkpoint loader",
        last_first=True,  # the plugin registered last is asked first
        reserved=frozenset(loader.name for loader in BUILTIN_LOADERS),
    ),
}
"""Kind name -> its hook: built-in kinds, and those plugins add (:func:`add_item_kind`)."""


def add_item_kind(name: str, kind: ItemKind) -> None:
    """Declare a kind of item that plugins register through a plugin-declared hook.

    Called by a plugin's :func:`~curvkit.hookspecs.curvkit_add_hookspecs` after
    it adds the hook's specification; :func:`items` then collects the items.
    Declaring the same kind again with the same definition is a no-op.

    Raises:
        PluginError: The name is taken by a different kind.
    """
    known = ITEM_KINDS.get(name)
    if known is not None and known != kind:
        raise PluginError(f"item kind {name!r} is already declared with hook {known.hook!r}")
    ITEM_KINDS[name] = kind


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
        # every plugin registered from now on may add hook specifications (pytest_addhooks)
        self.pm.hook.curvkit_add_hookspecs.call_historic(kwargs={"pluginmanager": self.pm})
        for module_name in BUILTIN_PLUGINS:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise PluginError(
                    f"built-in plugin {module_name} cannot be imported ({exc}); reinstall curvkit"
                ) from exc
            self.pm.register(module, name=module_name)
        self.broken: list[BrokenPlugin] = []
        self.versions: dict[str, str] = {}
        if not os.environ.get("CURVKIT_DISABLE_PLUGIN_AUTOLOAD"):
            self._load_entry_points()
        if os.environ.get("CURVKIT_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        self._check()
        self._items: dict[str, dict[str, Any]] = {}

    def _load_entry_points(self) -> None:
        """Register every installed plugin of the ``curvkit`` entry-point group.

        A plugin that fails to import is recorded (:class:`BrokenPlugin`), with a
        one-line :class:`~curvkit.CurvkitWarning`, and the others load: one broken
        package must not make curvkit unusable, and ``curvkit plugins`` lists it.
        """
        for dist in importlib.metadata.distributions():
            for entry in dist.entry_points:
                if entry.group != ENTRY_POINT_GROUP or self.pm.has_plugin(entry.name):
                    continue
                package = f"{dist.metadata['Name']} {dist.version}"
                try:
                    plugin = entry.load()
                    self.pm.register(plugin, name=entry.name)
                except Exception as exc:  # noqa: BLE001 - any error of third-party code
                    broken = BrokenPlugin(
                        entry.name, package, f"{entry.name} = {entry.value}", describe_error(exc)
                    )
                    self.broken.append(broken)
                    warnings.warn(str(broken), CurvkitWarning, stacklevel=4)
                    continue
                self.versions[entry.name] = dist.version

    def _check(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{exc}; hooks are listed in curvkit.hookspecs") from exc

    def items(self, kind_name: str) -> dict[str, Any]:
        """The named items of a kind, from every plugin's implementation of its hook (cached).

        Items must be instances of the kind's ``item_type`` with ``name`` and
        ``plugin`` fields; a reserved name or a name registered twice is an error
        naming the plugins.

        Raises:
            PluginError: An unknown kind, or a malformed or duplicate item.
        """
        if kind_name in self._items:
            return self._items[kind_name]
        kind = ITEM_KINDS.get(kind_name)
        if kind is None:
            raise PluginError(f"unknown kind of plugin item {kind_name!r}; known: {sorted(ITEM_KINDS)}")
        items: dict[str, Any] = {}
        impls = getattr(self.pm.hook, kind.hook).get_hookimpls()  # registration order
        for impl in reversed(impls) if kind.last_first else impls:
            returned = impl.function()
            if returned is not None and not isinstance(returned, list | tuple):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} returned a {type(returned).__name__} from {kind.hook}; "
                    f"return a list of curvkit.{kind.item_type.__name__} objects ([spec], not spec)"
                )
            for item in returned or []:
                if not isinstance(item, kind.item_type):
                    raise PluginError(
                        f"plugin {impl.plugin_name} returned {type(item).__name__} from "
                        f"{kind.hook}; return curvkit.{kind.item_type.__name__} objects"
                    )
                item.plugin = impl.plugin_name
                if item.name in kind.reserved:
                    raise PluginError(
                        f"{kind.what} {item.name!r} of plugin {item.plugin!r} has the name of "
                        f"a built-in {kind.what}; rename it"
                    )
                if item.name in items:
                    raise kind.duplicate_error(
                        f"{kind.what} {item.name!r} is registered by both plugin "
                        f"{items[item.name].plugin!r} and plugin {item.plugin!r}; "
                        "uninstall or rename one"
                    )
                items[item.name] = item
        self._items[kind_name] = items
        return items

    def refresh(self) -> None:
        """Forget the collected items (after plugins change) and collect every kind again."""
        self._items.clear()
        for kind_name in list(ITEM_KINDS):
            if hasattr(self.pm.hook, ITEM_KINDS[kind_name].hook):
                self.items(kind_name)

    def specs(self) -> dict[str, EstimatorSpec]:
        return self.items("estimators")

    def loaders(self) -> list[CheckpointLoader]:
        return list(self.items("checkpoint_loaders").values())

    def plugin_infos(self) -> list[PluginInfo]:
        from curvkit._version import __version__

        by_plugin: dict[str, list[str]] = {}
        for spec in self.specs().values():
            by_plugin.setdefault(spec.plugin, []).append(spec.name)
        loaders_by_plugin: dict[str, list[str]] = {}
        for loader in self.loaders():
            loaders_by_plugin.setdefault(loader.plugin, []).append(loader.name)
        infos = []
        for name, _ in self.pm.list_name_plugin():
            builtin = name in BUILTIN_PLUGINS
            version = __version__ if builtin else self.versions.get(name, "")
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


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin that failed to import.

    Attributes:
        name: The entry point's name.
        package: The distribution that installs it, with its version.
        entry_point: ``name = module:attr`` as declared.
        error: The exception, on one line.
    """

    name: str
    package: str
    entry_point: str
    error: str

    def __str__(self) -> str:
        return (
            f"curvkit plugin {self.name!r} of {self.package} (entry point {self.entry_point}) failed to "
            f"import: {self.error}; its estimators are unavailable (set CURVKIT_DISABLE_PLUGIN_AUTOLOAD=1 "
            "to skip installed plugins)"
        )


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
        raise PluginError(one_line(exc)) from exc
    try:
        reg._check()
        reg.refresh()
    except Exception:
        reg.pm.unregister(plugin)
        reg._items.clear()
        raise
    return plugin_name or ""


def unregister_plugin(plugin: object | None = None, name: str | None = None) -> None:
    """Remove a plugin registered with :func:`register_plugin`.

    Raises:
        PluginError: No such plugin is registered (the message lists the registered ones).
    """
    reg = _registry()
    registered = reg.pm.get_plugin(name) if name is not None else plugin
    if registered is None or reg.pm.get_name(registered) is None:
        known = ", ".join(n for n, _ in reg.pm.list_name_plugin())
        what = repr(name) if name is not None else repr(plugin)
        raise PluginError(f"cannot unregister {what}: no such plugin is registered (registered: {known})")
    reg.pm.unregister(plugin, name=name)
    reg._items.clear()


def items(kind: str) -> dict[str, Any]:
    """The items of a kind that plugins register, by name (see :data:`ITEM_KINDS`).

    Raises:
        PluginError: An unknown kind, or a malformed or duplicate item.
    """
    return dict(_registry().items(kind))


def broken_plugins() -> list[BrokenPlugin]:
    """Installed plugins that failed to import, with their error (``curvkit plugins`` lists them)."""
    return list(_registry().broken)


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
        broken = "".join(f"; plugin {b.name!r} of {b.package} failed to import" for b in _registry().broken)
        raise UnknownEstimatorError(
            f"unknown estimator {name!r}; {hint}available: {', '.join(sorted(specs))}{broken}"
        )
    return specs[name]


def curvature(name: str, problem: Any, **options: Any) -> CurvatureOperator:
    """The curvature operator of a registered estimator for a problem.

    Args:
        name: A registered estimator name (see :func:`estimators`).
        problem: The :class:`~curvkit.Problem`.
        **options: Passed to the estimator's factory, checked first (:func:`check_options`:
            their names, and a ``seed``).

    Example:
        >>> import torch, curvkit
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.zeros(2, 1)
        >>> H = curvkit.curvature("hessian", curvkit.Problem(model, "mse", (X, y)))
        >>> H @ torch.tensor([1.0, 1.0])   # H = 2/N X^T X = diag(1, 4)
        tensor([1., 4.])
    """
    spec = get_estimator(name)
    options = check_options(spec, options)
    op = spec.factory(problem, **options)
    if not isinstance(op, CurvatureOperator):
        raise PluginError(
            f"estimator {name!r} of plugin {spec.plugin!r} returned {type(op).__name__}, "
            "not a curvkit.CurvatureOperator"
        )
    op.name = name
    return op


def keyword_options(
    function: Callable[..., Any], *, positional: int = 0, passed: Collection[str] = ()
) -> list[str] | None:
    """The keyword options ``function`` takes besides the arguments its caller passes itself.

    Args:
        function: A factory or a solver.
        positional: How many leading parameters its caller passes by position
            (an estimator's problem; a solver's operator and right-hand sides).
        passed: The names of the parameters its caller passes by keyword (a
            solver's ``damping``, ``tol``...).

    Returns:
        The names of its other parameters that a keyword can give, or ``None``:
        any (it takes ``**kwargs``, or has no signature to read).
    """
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: let it decide
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters[positional:] if p.kind in named and p.name not in passed]


def refuse_unknown_options(what: str, known: list[str] | None, options: Mapping[str, Any]) -> None:
    """Refuse the ``options`` that are not ``known`` (``None``: any is), listing those that are.

    Args:
        what: Who takes them, for the message (``"estimator 'hessian'"``, ``"solver 'cg'"``).
        known: The options it takes (:func:`keyword_options`).
        options: The options given.

    Raises:
        UnknownOptionError: One line naming the unknown options and ``what``'s.
    """
    unknown = [key for key in options if known is not None and key not in known]
    if unknown:
        takes = f"its options: {', '.join(known)}" if known else "it takes no options"
        raise UnknownOptionError(f"{what} takes no option {', '.join(map(repr, unknown))}; {takes}")


def estimator_options(spec: EstimatorSpec) -> list[str] | None:
    """The keyword options an estimator's factory takes (``None``: any, it takes ``**kwargs``)."""
    return keyword_options(spec.factory, positional=1)


def check_options(spec: EstimatorSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse options the estimator does not take, listing those it does, and a ``seed`` that is none.

    A ``seed`` is what seeds a Monte-Carlo estimator's samples (the operator
    contract's, :class:`curvkit.ProblemOperator`) or any estimator's random draws
    (``d3``'s random direction): for every estimator, an integer in ``[0, 2**63)``
    (:func:`curvkit.arguments.seed`), or ``None`` (draw a fresh one), checked here
    once for all, before the factory is called.

    Returns:
        The options, a ``seed`` as a plain ``int``.

    Raises:
        UnknownOptionError: An option the factory's signature does not name.
        CurvkitError: A ``seed`` that is not ``None`` nor an integer in ``[0, 2**63)``
            (``"fisher.seed must be an integer >= 0 and < 2**63 or None, got 1.5"``).
    """
    refuse_unknown_options(f"estimator {spec.name!r}", estimator_options(spec), options)
    checked = dict(options)
    if "seed" in checked:
        checked["seed"] = seed(checked["seed"], f"{spec.name}.seed", allow_none=True)
    return checked
