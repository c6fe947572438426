"""Snapshots of a model's parameters and buffers, to notice when cached work is stale.

A :class:`~curvkit.Problem` caches work that depends on the model's state
(gradient graphs, the determinism probe); :class:`ModelSnapshot` says whether
that state is still the one the work was done for, and
:func:`fixed_model_state` lets an analysis compare contents once instead of
before every product (one host-device synchronisation per analysis on a GPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ModelSnapshot", "contents_equal", "fixed_model_state"]


class ModelSnapshot:
    """The state of a model's parameters and buffers at one moment.

    :meth:`is_current` is true while no parameter or buffer has been replaced or
    changed. It compares version counters first (cheap, on the host), then
    contents, so that edits through ``.data`` (which bypass version counters) are
    noticed too. The copy costs one parameter-sized buffer; the comparison is
    O(P), negligible next to a pass over the data, and takes one host-device
    synchronisation per device (not one per tensor).

    Within :func:`fixed_model_state` (which every analysis of :mod:`curvkit.linalg`
    enters) the contents are compared once, when the analysis takes its first
    snapshot; its further products compare version counters only, so that a
    GPU run does not synchronise before every product.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = self._tensors()
        self.keys = [self._key(t) for t in self.tensors]
        self.values = [t.detach().clone() for t in self.tensors]
        verified = _VERIFIED.get()
        if verified is not None:  # taken within the scope: its contents are the model's now
            verified.add(self)

    def _tensors(self) -> list[Tensor]:
        return list(self.model.parameters()) + list(self.model.buffers())

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (t.data_ptr(), t._version, t.dtype, t.device, t.shape)

    def is_current(self) -> bool:
        """Whether the model still has exactly these parameters and buffers."""
        tensors = self._tensors()
        if len(tensors) != len(self.tensors) or any(
            a is not b or self._key(a) != k for a, b, k in zip(tensors, self.tensors, self.keys)
        ):
            return False
        verified = _VERIFIED.get()
        if verified is not None and self in verified:
            return True
        if not contents_equal(tensors, self.values):
            return False
        if verified is not None:
            verified.add(self)
        return True


_VERIFIED: contextvars.ContextVar[weakref.WeakSet[ModelSnapshot] | None] = contextvars.ContextVar(
    "curvkit_verified_snapshots", default=None
)
"""The snapshots whose contents were compared within the current :func:`fixed_model_state` (else ``None``).

Weak references: a snapshot replaced by a newer one (the model was updated within
the scope, as in a training loop) is freed with its copy of the parameters."""


@contextlib.contextmanager
def fixed_model_state() -> Iterator[None]:
    """A scope in which models change only through their version counters: contents compared once.

    An analysis (an eigenvalue run, a trace, a solve) takes many products while
    the model does not change, since no user code runs in between. Within this
    scope :meth:`ModelSnapshot.is_current` compares a snapshot's contents with
    the model's the first time only; afterwards it checks the host-side keys
    (tensor identity, storage, version counter, dtype, shape), which notice every
    change but an edit through ``.data`` made during the analysis itself (from a
    progress callback or another thread). On a GPU the content comparison is a
    host-device synchronisation, so this takes one per analysis instead of one
    per product. Scopes nest (the outermost one counts) and are per thread.

    Usable as a decorator; the public functions of :mod:`curvkit.linalg` are
    decorated with it.
    """
    if _VERIFIED.get() is not None:
        yield
        return
    token = _VERIFIED.set(weakref.WeakSet())
    try:
        yield
    finally:
        _VERIFIED.reset(token)


def contents_equal(tensors: Sequence[Tensor], values: Sequence[Tensor]) -> bool:
    """Whether each tensor equals its value entry for entry (as :func:`torch.equal`), one sync per device.

    CPU tensors are compared with :func:`torch.equal` (no synchronisation to
    save); on other devices the per-tensor flags are reduced on the device and
    read back once.
    """
    flags: dict[torch.device, list[Tensor]] = {}
    for t, v in zip(tensors, values):
        if t.device.type == "cpu":
            if not torch.equal(t.detach(), v):
                return False
        else:
            flags.setdefault(t.device, []).append(torch.eq(t.detach(), v).all())
    return all(bool(torch.stack(device_flags).all()) for device_flags in flags.values())
