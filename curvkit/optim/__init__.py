"""Curvature as ``torch.optim`` optimizers (``docs/optimizers.md``).

* :class:`NewtonSummary`: SGD with momentum whose per-subset learning rates come
  from the Newton summary and its third-order regularisation (Wolinski 2023).
* :class:`Newton` (exact, damped, saddle-free, trust-region) and
  :class:`HessianFree` (Martens 2010): the batch's Hessian or GGN, dense or by CG.
* :class:`KFAC` and :class:`EKFAC` (Martens and Grosse 2015; George et al.
  2018): moving averages of the Kronecker factors, adaptive damping, KL clipping.
* :class:`NaturalGradient`: the batch's low-rank GGN or Fisher, solved in the
  batch x outputs space.
* :class:`DiagonalNewton`, :class:`AdaHessian` (Yao et al. 2021) and
  :class:`SophiaH` (Liu et al. 2023): Hutchinson diagonals through the gradient's graph.
* :class:`Shampoo` (Gupta et al. 2018; Anil et al. 2020).
* :class:`CurvaturePreconditioner`: any registered estimator preconditions the
  gradients of any first-order optimizer.
* :class:`CurvatureOptimizer`: their shared base (checked hyper-parameters,
  never-NaN steps, the mini-batch's :class:`curvkit.Problem`, resumable state).
"""

from curvkit.optim.base import CurvatureOptimizer
from curvkit.optim.diagonal import AdaHessian, DiagonalNewton, SophiaH
from curvkit.optim.hessian_free import HessianFree
from curvkit.optim.kfac import EKFAC, KFAC
from curvkit.optim.natural_gradient import NaturalGradient
from curvkit.optim.newton import Newton
from curvkit.optim.newton_summary import NewtonSummary, SummaryStep
from curvkit.optim.preconditioner import CurvaturePreconditioner
from curvkit.optim.shampoo import Shampoo

__all__ = [
    "AdaHessian",
    "CurvatureOptimizer",
    "CurvaturePreconditioner",
    "DiagonalNewton",
    "EKFAC",
    "HessianFree",
    "KFAC",
    "NaturalGradient",
    "Newton",
    "NewtonSummary",
    "Shampoo",
    "SophiaH",
    "SummaryStep",
]
