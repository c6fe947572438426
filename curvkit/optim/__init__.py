"""Curvature as ``torch.optim`` optimizers.

* :class:`NewtonSummary`: SGD with momentum whose per-subset learning rates come
  from the Newton summary and its third-order regularisation (Wolinski 2023).
* :class:`CurvatureOptimizer`: their shared base (checked hyper-parameters,
  never-NaN steps, the mini-batch's :class:`curvkit.Problem`, resumable state).
"""

from curvkit.optim.base import CurvatureOptimizer
from curvkit.optim.newton_summary import NewtonSummary, SummaryStep

__all__ = ["CurvatureOptimizer", "NewtonSummary", "SummaryStep"]
