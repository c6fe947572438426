"""curvkit: curvature of PyTorch models, with estimators as plugins.

The public API::

    import curvkit
    problem = curvkit.Problem(model, loss="cross_entropy", data=(X, y))
    H = curvkit.curvature("hessian", problem)
    H @ v, H.to_dense(), 2.0 * H, H + G, H.damped(1e-3)
    curvkit.estimators()
    res = curvkit.eigenvalues(H, k=5)             # values, residual certificates
    tr = curvkit.trace(H, method="hutch++", matvecs=300)
    d = curvkit.diagonal(H, method="hutchinson", matvecs=100)  # or A.diagonal(), exact
    dens = curvkit.density(H, steps=100, runs=5)  # stochastic Lanczos quadrature
    curvkit.per_layer(H)                          # top eigenvalue and trace per layer
    with curvkit.fixed_model_state():             # your own loop of products: the model's
        ys = [H @ v for v in vs]                  #   contents compared once (GPU: one sync)
    curvkit.analyze(["ckpt.pt"], output="results.h5")  # what `curvkit analyze` does
    # under torchrun, after torch.distributed.init_process_group(): every process its
    # shard of the data, the sums reduced (curvkit.distributed, curvkit.LocalShard)
    curvkit.newton_summary(problem, "canonical")   # Wolinski's g_bar, H_bar, D3
    opt = curvkit.NewtonSummary(param_groups, full_loss, hg_loader)  # also curvkit.optim

Estimator plugins check their numeric options with :mod:`curvkit.arguments`
(``curvkit.arguments.integer(mc_samples, "mc_samples")``): the core's rules and
messages.

``import curvkit`` does not import typer, h5py or matplotlib.
"""

from curvkit import arguments, distributed, partition
from curvkit._version import __version__
from curvkit.analysis import AnalysisPlan
from curvkit.checkpoints import (
    CheckpointError,
    CheckpointLoader,
    LoadedCheckpoint,
    load_checkpoint,
    resolve_factory,
    save_checkpoint,
    trusted_factory,
)
from curvkit.composite_norms import CompositeNorms
from curvkit.data import LocalShard
from curvkit.directions import DIRECTIONS, resolve_direction
from curvkit.errors import (
    CurvkitError,
    CurvkitWarning,
    DataError,
    DenseTooLargeError,
    DuplicateEstimatorError,
    NoExactFisherError,
    NonConvexLossError,
    NonDeterministicError,
    NonFiniteError,
    NotNegativeLogLikelihoodError,
    ParameterSelectionError,
    PluginError,
    ProcessCrashedError,
    ProcessFailedError,
    ShapeMismatchError,
    ShardError,
    UnboundedModelError,
    UnknownEstimatorError,
    UnknownLossError,
    UnknownOptionError,
    UnsupportedModelError,
)
from curvkit.hookspecs import hookimpl, hookspec
from curvkit.kronecker import KroneckerBlock, KroneckerOperator
from curvkit.layout import ParameterLayout
from curvkit.linalg.diagonal import DiagonalResult, diagonal
from curvkit.linalg.eigen import EigenResult, eigenvalues
from curvkit.linalg.ihvp import IhvpResult, SolverCurve, ihvp_accuracy
from curvkit.linalg.per_layer import LayerRow, LayerTable, per_layer
from curvkit.linalg.slq import DensityResult, density
from curvkit.linalg.solve import InverseOperator, SolveResult, SolverSpec, inverse, solve, solvers
from curvkit.linalg.trace import TraceResult, trace
from curvkit.newton import SummaryResult, newton_summary
from curvkit.operator import (
    CurvatureOperator,
    DenseOperator,
    DiagonalOperator,
    IdentityOperator,
    RestrictedOperator,
    ScaledOperator,
    SumOperator,
)
from curvkit.optim import NewtonSummary
from curvkit.problem import ModelSnapshot, Problem
from curvkit.problem_operator import ProblemOperator
from curvkit.registry import (
    EstimatorSpec,
    PluginInfo,
    checkpoint_loaders,
    curvature,
    estimators,
    get_estimator,
    loaded_plugins,
    plugin_manager,
    register_plugin,
    unregister_plugin,
)
from curvkit.running import RunningCurvature
from curvkit.runs import AnalyzeReport, ProblemSettings, analyze
from curvkit.snapshot import fixed_model_state

__all__ = [
    "AnalysisPlan",
    "AnalyzeReport",
    "ProblemSettings",
    "analyze",
    "CheckpointError",
    "CheckpointLoader",
    "LoadedCheckpoint",
    "checkpoint_loaders",
    "load_checkpoint",
    "resolve_factory",
    "save_checkpoint",
    "trusted_factory",
    "CompositeNorms",
    "LocalShard",
    "CurvatureOperator",
    "CurvkitError",
    "CurvkitWarning",
    "DataError",
    "DIRECTIONS",
    "DenseOperator",
    "DiagonalOperator",
    "DenseTooLargeError",
    "DensityResult",
    "DiagonalResult",
    "DuplicateEstimatorError",
    "EigenResult",
    "IhvpResult",
    "SolverCurve",
    "SummaryResult",
    "NewtonSummary",
    "EstimatorSpec",
    "IdentityOperator",
    "InverseOperator",
    "KroneckerBlock",
    "KroneckerOperator",
    "LayerRow",
    "LayerTable",
    "ModelSnapshot",
    "fixed_model_state",
    "NoExactFisherError",
    "UnboundedModelError",
    "UnsupportedModelError",
    "NonConvexLossError",
    "NonDeterministicError",
    "NonFiniteError",
    "NotNegativeLogLikelihoodError",
    "ParameterLayout",
    "ParameterSelectionError",
    "PluginError",
    "PluginInfo",
    "ProcessCrashedError",
    "ProcessFailedError",
    "Problem",
    "ProblemOperator",
    "RestrictedOperator",
    "RunningCurvature",
    "ScaledOperator",
    "SolveResult",
    "SolverSpec",
    "ShapeMismatchError",
    "ShardError",
    "SumOperator",
    "TraceResult",
    "UnknownEstimatorError",
    "UnknownLossError",
    "UnknownOptionError",
    "__version__",
    "curvature",
    "density",
    "diagonal",
    "resolve_direction",
    "eigenvalues",
    "ihvp_accuracy",
    "newton_summary",
    "partition",
    "distributed",
    "arguments",
    "estimators",
    "get_estimator",
    "hookimpl",
    "hookspec",
    "inverse",
    "plugin_manager",
    "loaded_plugins",
    "per_layer",
    "register_plugin",
    "solve",
    "solvers",
    "trace",
    "unregister_plugin",
]
