"""Hook specifications: the plugin author's reference.

curvkit is extended with `pluggy <https://pluggy.readthedocs.io>`_ plugins. A
plugin is a module or object with functions decorated by :data:`curvkit.hookimpl`
whose names are the hooks below. Built-in estimators are plugins on exactly
these hooks.

Installing a plugin: declare an entry point in the ``curvkit`` group of your
package's ``pyproject.toml``::

    [project.entry-points.curvkit]
    my_estimators = "my_package.curvkit_plugin"

curvkit loads every such entry point when the registry is first used, unless the
environment variable ``CURVKIT_DISABLE_PLUGIN_AUTOLOAD`` is set (to anything
non-empty). ``CURVKIT_TRACE_PLUGINS=1`` prints every hook call to stderr. A
plugin can also be registered at run time with :func:`curvkit.register_plugin`.

Implementations of hooks that do not exist are rejected when plugins load, so a
misspelt hook name fails loudly instead of being ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from curvkit.registry import EstimatorSpec

__all__ = ["hookimpl", "hookspec", "PROJECT_NAME"]

PROJECT_NAME = "curvkit"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def curvkit_register_estimators() -> list[EstimatorSpec]:
    """Register curvature estimators.

    Called once, when the estimator registry is first built. Every plugin's
    implementation is called; the lists are concatenated. Two estimators with the
    same name (from any plugins) are an error naming both plugins.

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

            def _problem_matmat(self, M):
                return M

        @curvkit.hookimpl
        def curvkit_register_estimators():
            return [curvkit.EstimatorSpec(
                name="identity", factory=DiagonalOne,
                description="The identity, as a placeholder curvature.")]

    Check it with the conformance battery::

        from curvkit.testing import check_estimator
        check_estimator("identity").raise_on_failure()
    """
