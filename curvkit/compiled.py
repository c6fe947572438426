"""Models wrapped by ``torch.compile``: their curvature is their original module's.

``torch.compile(model)`` returns a ``torch._dynamo.eval_frame.OptimizedModule``
that runs the original module (``._orig_mod``) through generated code; its
parameters are the original module's tensors, named with an ``_orig_mod.``
prefix. The function it computes is the original module's, so its curvature is
too, but the generated code cannot be differentiated twice (AOTAutograd has no
double backward, and its backward with donated buffers refuses ``create_graph``):
a Hessian-vector product through it fails inside torch.

So curvkit computes on the original module: :func:`original_module` takes the
wrappers off a model (:class:`curvkit.Problem` does, so the parameter names are
the original module's, as :func:`curvkit.load_checkpoint` strips ``_orig_mod.``
from a checkpoint's keys), and a compiled *submodule* inside a model
(:func:`compiled_submodules`) runs eagerly while curvkit evaluates the model
(:func:`eager_compiled`).

Nothing here imports ``torch._dynamo``: a model can hold a compiled module only
once torch has imported it.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

__all__ = ["EAGER_AVAILABLE", "compiled_submodules", "eager_compiled", "original_module"]

_EVAL_FRAME = "torch._dynamo.eval_frame"
"""The module that defines ``OptimizedModule``, torch.compile's wrapper of a module."""


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is torch.compile's wrapper of a module (``OptimizedModule``)."""
    eval_frame = sys.modules.get(_EVAL_FRAME)
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def original_module(model: nn.Module) -> nn.Module:
    """``model`` without its ``torch.compile`` wrappers (``._orig_mod``, repeatedly); else ``model`` itself.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> original_module(torch.compile(net)) is net, original_module(net) is net
        (True, True)
    """
    while _is_compiled(model):
        model = model._orig_mod
    return model


def compiled_submodules(model: nn.Module) -> list[str]:
    """Names of ``model``'s submodules that are ``torch.compile`` wrappers (``""``: the model itself)."""
    return [name for name, module in model.named_modules() if _is_compiled(module)]


EAGER_AVAILABLE: bool = hasattr(torch.compiler, "set_stance")
"""Whether the installed torch can run compiled code eagerly (``torch.compiler.set_stance``, torch 2.6+)."""


def eager_compiled() -> contextlib.AbstractContextManager[None]:
    """A scope in which ``torch.compile``'d modules and functions run their original Python eagerly.

    ``torch.compiler.set_stance("force_eager")`` (only where
    :data:`EAGER_AVAILABLE`): the code computes the same function,
    differentiable to any order. It costs a fraction of a millisecond to enter,
    so callers enter it only for a model that holds compiled submodules.
    """
    return torch.compiler.set_stance("force_eager")
