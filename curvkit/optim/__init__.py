"""Curvature as ``torch.optim`` optimizers.

* :class:`NewtonSummary`: SGD with momentum whose per-subset learning rates come
  from the Newton summary and its third-order regularisation (Wolinski 2023).
"""

from curvkit.optim.newton_summary import NewtonSummary, SummaryStep

__all__ = ["NewtonSummary", "SummaryStep"]
