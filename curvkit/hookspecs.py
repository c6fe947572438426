"""Hook specifications: the plugin author's reference.

curvkit is extended with `pluggy <https://pluggy.readthedocs.io>`_ plugins. A
plugin is a module or object with functions decorated by :data:`curvkit.hookimpl`
whose names are the hooks below. Built-in estimators are plugins on exactly
these hooks; the built-in checkpoint formats live in :mod:`curvkit.checkpoints`
and are asked after the plugins' loaders.

Installing a plugin: declare an entry point in the ``curvkit`` group of your
package's ``pyproject.toml``::

    [project.entry-points.curvkit]
    my_estimators = "my_package.curvkit_plugin"

curvkit loads every such entry point when the registry is first used, unless the
environment variable ``CURVKIT_DISABLE_PLUGIN_AUTOLOAD`` is set (to anything
non-empty). ``CURVKIT_TRACE_PLUGINS=1`` prints every hook call to stderr. A
plugin can also be registered at run time with :func:`curvkit.register_plugin`.

Implementations of hooks that do not exist are rejected when plugins load, so a
misspelt hook name fails loudly instead of being ignored. A plugin whose module
fails to import is reported (a one-line warning; ``curvkit plugins`` lists it)
and the others load.

``docs/plugins.md`` is the guide: a data-backed estimator from scratch (the
per-batch product, the loss's output Hessian, options, flags and what each makes
the conformance battery check, the reference), running the battery, packaging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from curvkit.checkpoints._types import CheckpointLoader
    from curvkit.estimator_spec import EstimatorSpec
    from curvkit.kind_spec import AnalysisKind
    from curvkit.solver_spec import SolverSpec

__all__ = ["hookimpl", "hookspec", "PROJECT_NAME"]

PROJECT_NAME = "curvkit"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(historic=True)
def curvkit_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Add hook specifications of your own (pluggy's and pytest's ``addhooks`` pattern).

    Called for every plugin as it is registered, before its hooks are checked. A
    plugin that lets *other* plugins extend it declares its hooks here, with
    ``pluginmanager.add_hookspecs(namespace)``, and the kind of item they
    register with :func:`curvkit.registry.add_item_kind`; it then reads them with
    :func:`curvkit.registry.items`. The built-in ``kfac`` estimator declares
    ``curvkit_kfac_layer_rules`` this way (see ``docs/kfac.md``).

    Returns:
        Nothing: the hook acts on ``pluginmanager``.

    Example::

        class MyHooks:
            @curvkit.hookspec
            def my_plugin_register_things() -> list[Thing]:
                "..."

        @curvkit.hookimpl
        def curvkit_add_hookspecs(pluginmanager):
            pluginmanager.add_hookspecs(MyHooks)
            curvkit.registry.add_item_kind(
                "things", curvkit.registry.ItemKind("my_plugin_register_things", Thing, "thing"))
    """


@hookspec
def curvkit_register_estimators() -> list[EstimatorSpec]:
    """Register curvature estimators.

    Called once, when the estimator registry is first built. Every plugin's
    implementation is called; the lists are concatenated. Two estimators with the
    same name (from any plugins) are an error naming both plugins.

    Return a *list* (``[spec]``, not ``spec``). Writing the estimator itself,
    its flags and its reference is explained in ``docs/plugins.md``.

    Returns:
        A list of :class:`curvkit.EstimatorSpec`. ``spec.factory(problem, **options)``
        must return a :class:`curvkit.CurvatureOperator` over the problem's
        selected parameters; ``options`` are the keyword arguments the user passes
        to :func:`curvkit.curvature`.

    Example::

        import curvkit

        class DiagonalOne(curvkit.ProblemOperator):
            PSD = True
            EXACT = False

            def _product(self, M, snapshot):
                return M.clone()

        @curvkit.hookimpl
        def curvkit_register_estimators():
            return [curvkit.EstimatorSpec(
                name="identity", factory=DiagonalOne,
                description="The identity, as a placeholder curvature.")]

    Check it with the conformance battery::

        from curvkit.testing import check_estimator
        check_estimator("identity").raise_on_failure()
    """


@hookspec
def curvkit_register_solvers() -> list[SolverSpec]:
    """Register solvers of ``(A + damping I) X = B`` for :func:`curvkit.solve` and :func:`curvkit.inverse`.

    Called once, when the solvers are first needed; the lists of every plugin are
    concatenated, and two solvers with one name are an error naming both plugins.
    The built-ins (``exact``, ``cg``, ``minres``, ``neumann``, ``lissa``, ``kfac``,
    ``ekfac``, ``lowrank``) are a plugin on this hook.

    Returns:
        A list of :class:`curvkit.SolverSpec`. ``spec.solve(A, B, *, damping, tol,
        maxiter, x0, preconditioner, **options)`` gets ``B`` as ``[P, K]`` (``x0``
        the same, or ``None``) and returns a :class:`curvkit.SolveResult` with
        ``x`` of that shape; it must say ``converged`` only for a measured relative
        residual within ``tol``, give why it stopped as a ``status`` token of
        :data:`curvkit.linalg.solve.SOLVE_STATUSES` (what callers branch on; an
        unknown one is refused in one line) and a ``reason`` in words, and keep a
        ``history`` (:class:`curvkit.linalg.solve.SolveHistory` keeps it, and its
        ``result`` / ``measured`` take the status). When
        the caller gives one, it also gets ``callback``: called with each
        recorded iterate, its numbers join that row of the history (the
        inverse-HVP accuracy analysis measures each iterate's error this way; a
        solver that never calls it leaves those columns empty, as NaN).

        The spec declares how its options' values are checked: ``option_checks``
        (by option, ``check(value, name)`` returning the value to use, e.g. the
        checks of :mod:`curvkit.arguments`), ``dimension_checks`` (bounds on the
        number of parameters ``P``: ``check(value, name, P)``) and ``sample_checks``
        (bounds on the number of samples ``N`` of the operator's data: ``check(value,
        name, N)``). They are applied
        before ``solve`` is called (:func:`curvkit.linalg.solve.check_solver_options`),
        and by ``curvkit analyze --ihvp-option`` before anything runs; an option
        without one is passed as given.

    Example::

        import curvkit
        from curvkit.arguments import fraction
        from curvkit.linalg.krylov import conjugate_gradient

        @curvkit.hookimpl
        def curvkit_register_solvers():
            return [curvkit.SolverSpec("cg-twice", lambda A, B, **kw: conjugate_gradient(A, B, **kw),
                                       "CG under another name", psd_only=True),
                    curvkit.SolverSpec("relaxed", relaxed, "omega B, omega in [0, 1]",
                                       option_checks={"omega": fraction})]
    """


@hookspec
def curvkit_register_analysis_kinds() -> list[AnalysisKind]:
    """Add kinds of analysis to ``curvkit analyze``, the HDF5 store, ``show``, ``plot`` and ``export``.

    Called once, when the kinds are first needed; the lists of every plugin are
    concatenated after the built-in kinds (:data:`curvkit.kinds.BUILTIN_KINDS`),
    and a name taken by a built-in kind or another plugin is an error naming
    both. A kind is one row of the table in :mod:`curvkit.kinds`: how its
    analyses are chosen from a plan (``keys``), what makes a result reusable on
    resume (``request``), how one is computed from an
    :class:`~curvkit.kinds.AnalysisContext` (``compute``), written to and read
    from an h5py group (``write``, ``read``; :mod:`curvkit.kinds.hdf5` has the
    helpers), exported (``rows``), summarised (``summarize``), tabulated
        (``tables``) and drawn (``figures``). Its options come from
    ``AnalysisPlan(options={name: {...}})``, validated by its ``check`` when the
    plan is made and, for what depends on the number of parameters ``P`` or of
    samples ``N``, by its ``check_dimension(options, P, N)`` once they are known and
    before anything is written; a kind whose ``keys`` return nothing without options runs only when asked.

    Returns:
        A list of :class:`curvkit.kinds.AnalysisKind`.

    Example::

        import curvkit
        from curvkit.kind_spec import AnalysisKind

        def keys(plan, psd, estimator):
            return ["frobenius/probe"] if "frobenius" in plan.options else []

        def compute(context, key):  # ||A||_F^2 = E ||A z||^2 for Rademacher z
            ...

        @curvkit.hookimpl
        def curvkit_register_analysis_kinds():
            return [AnalysisKind("frobenius", curvkit.TraceResult, keys, lambda plan, key: {...},
                                 compute, write, read, rows, summarize, check=lambda options: None)]

    ``tests/test_analysis_kinds.py`` registers a complete one.
    """


@hookspec
def curvkit_checkpoint_loaders() -> list[CheckpointLoader]:
    """Add checkpoint formats to :func:`curvkit.load_checkpoint` and ``curvkit analyze``.

    Called once, when the loaders are first needed. Every plugin's
    implementation is called; the lists are concatenated. Two loaders with the
    same name, or a loader named like a built-in format (``safetensors``,
    ``torch.export``, ``torchscript``, ``torch``), are an error naming the plugins.

    Calling semantics: for each checkpoint, the plugins' loaders are asked
    first, the plugin registered last first, then the built-in formats; the
    first loader whose ``detect(path)`` is true reads the file. So a plugin can
    take over files a built-in loader would also accept (for example a zip that
    ``torch.load`` would misread), and should make ``detect`` specific.

    Returns:
        A list of :class:`curvkit.CheckpointLoader`:

        * ``detect(path: pathlib.Path) -> bool``: cheap (suffix, first bytes),
          called for existing files and directories only, must not raise for
          files of other formats. It also decides which entries of a folder
          are checkpoints (:func:`curvkit.checkpoints.find_checkpoints`), so
          it is asked about every file there and should be specific.
        * ``load(path, *, map_location: torch.device, trust_pickle: bool,
          **kwargs) -> dict | torch.nn.Module``: an ``nn.Module`` is a
          self-contained model (it is moved to ``map_location`` and put in
          evaluation mode); a dict is a ``state_dict`` or a checkpoint dict
          (``{"curvkit": metadata, "model_state_dict": ...}``, the tutorial
          dict, ...) that curvkit unpacks and loads into the model given by
          ``--model`` or by the metadata. Tensors saved on another device must
          be loaded onto ``map_location`` (a GPU-saved file must load on a
          CPU-only machine). Unpickle arbitrary objects only if
          ``trust_pickle``. Accept ``**kwargs``: later versions may pass more
          keyword arguments. Raise :class:`curvkit.CheckpointError` with a
          one-line message for bad files; other exceptions are reported as
          the plugin's failure.

    Example::

        import numpy as np
        import torch
        import curvkit

        def is_npz(path):
            return path.suffix == ".npz" and path.is_file()

        def load_npz(path, *, map_location, trust_pickle, **kwargs):
            with np.load(path, allow_pickle=trust_pickle) as f:
                return {k: torch.from_numpy(f[k]).to(map_location) for k in f.files}

        @curvkit.hookimpl
        def curvkit_checkpoint_loaders():
            return [curvkit.CheckpointLoader(
                name="npz-weights", detect=is_npz, load=load_npz,
                description="numpy .npz archives of named weight arrays")]
    """
