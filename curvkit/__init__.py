"""curvkit: curvature (Hessian, Gauss-Newton, Fisher) of PyTorch models, as plugins.

The public API::

    import curvkit
    problem = curvkit.Problem(model, loss="cross_entropy", data=(X, y))
    H = curvkit.curvature("hessian", problem)
    H @ v, H.to_dense(), 2.0 * H, H + G, H.damped(1e-3)
    curvkit.estimators()
    res = curvkit.eigenvalues(H, k=5)             # values, residual certificates

``import curvkit`` does not import typer, h5py or matplotlib.
"""

from curvkit._version import __version__
from curvkit.errors import (
    CurvkitError,
    DataError,
    DenseTooLargeError,
    DuplicateEstimatorError,
    NonDeterministicError,
    ParameterSelectionError,
    PluginError,
    ShapeMismatchError,
    UnknownEstimatorError,
    UnknownLossError,
)
from curvkit.hookspecs import hookimpl, hookspec
from curvkit.layout import ParameterLayout
from curvkit.linalg.eigen import EigenResult, eigenvalues
from curvkit.operator import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    RestrictedOperator,
    ScaledOperator,
    SumOperator,
)
from curvkit.problem import ModelSnapshot, Problem
from curvkit.problem_operator import ProblemOperator
from curvkit.registry import (
    EstimatorSpec,
    PluginInfo,
    curvature,
    estimators,
    get_estimator,
    loaded_plugins,
    plugin_manager,
    register_plugin,
    unregister_plugin,
)

__all__ = [
    "CurvatureOperator",
    "CurvkitError",
    "DataError",
    "DenseOperator",
    "DenseTooLargeError",
    "DuplicateEstimatorError",
    "EigenResult",
    "EstimatorSpec",
    "IdentityOperator",
    "ModelSnapshot",
    "NonDeterministicError",
    "ParameterLayout",
    "ParameterSelectionError",
    "PluginError",
    "PluginInfo",
    "Problem",
    "ProblemOperator",
    "RestrictedOperator",
    "ScaledOperator",
    "ShapeMismatchError",
    "SumOperator",
    "UnknownEstimatorError",
    "UnknownLossError",
    "__version__",
    "curvature",
    "eigenvalues",
    "estimators",
    "get_estimator",
    "hookimpl",
    "hookspec",
    "plugin_manager",
    "loaded_plugins",
    "register_plugin",
    "unregister_plugin",
]
