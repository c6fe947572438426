"""Choosing how to compute a product from the products themselves.

Several ways often compute the same curvature product: forward-mode Jacobian
products with :mod:`torch.func` or the double-vjp trick with plain autograd, a
vectorised backward pass or a loop over directions, per-sample gradients or
output-space products. Which is fastest depends on the model, the batch, the
number of directions ``K`` and the device, and some ways fail on some models (an
operator without a forward-mode derivative or a batching rule). :class:`Choice`
decides from real products, so that deciding costs no extra work:

* ``trials=0``: the first way that does not raise is kept for good (a failure
  sends the same call on to the next way);
* ``trials=n``: for each key (the number of directions ``K``), the first ``n``
  calls per remaining way are timed, the ways taking turns, and the way with the
  smallest best time is kept for that key.

In a data-parallel run (:mod:`curvkit.distributed`) each process times and
decides for itself: a choice made per batch is reached a different number of
times in processes with shards of different sizes, so no collective can decide
for all of them there. Nothing depends on their agreeing: each process's
contribution is rounded its way, and the one reduction hands every process the
same sum.

The ways compute the same product but may round differently (in float32 about
one unit in the last place), so which one is kept, and hence the last bits of a
product, can change between runs; an estimator offers a ``strategy`` option that
pins one way for bit-for-bit repeatable products.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

from curvkit.errors import CurvkitError

__all__ = ["AUTO_TRIALS", "Choice", "strategy_choice", "synchronize"]

AUTO_TRIALS = 3
"""Timed products per way before a timed :class:`Choice` decides."""

W = TypeVar("W")
T = TypeVar("T")


class Choice(Generic[W, T]):
    """The way to compute something, chosen from real calls: the first that works, or the fastest.

    ``choice(compute, generator, key)`` calls ``compute(way)`` for the way in use
    and returns its result. A way that raises one of ``errors`` is ruled out for
    good and the same call goes on to the next way (the last way's error
    propagates); a generator passed along is restored first, so that a
    Monte-Carlo estimator draws the same samples whichever way computes. The
    decision belongs to the operator that holds the object (one per operator,
    rebuilt by ``restrict``).

    Args:
        ways: The candidates, preferred first.
        errors: The exceptions that rule a way out.
        trials: ``0``: keep the first way that works. ``n > 0``: per key, time
            ``n`` calls of every remaining way (taking turns), then keep the one
            with the smallest best time.

    Example:
        >>> choice = Choice(("fast", "slow"), errors=(ZeroDivisionError,))
        >>> choice(lambda way: 1 / 0 if way == "fast" else way), choice.chosen()
        ('slow', 'slow')
        >>> Choice(("fast",))(lambda way: 1 / 0)
        Traceback (most recent call last):
        ...
        ZeroDivisionError: division by zero
    """

    def __init__(
        self,
        ways: Sequence[W],
        errors: tuple[type[BaseException], ...] = (RuntimeError,),
        trials: int = 0,
    ):
        if not ways:
            raise ValueError("a Choice needs at least one way")
        self.ways: tuple[W, ...] = tuple(ways)
        self.errors = errors
        self.trials = trials
        self.ruled_out: list[W] = []
        self._chosen: dict[Hashable, W] = {}
        self._times: dict[Hashable, dict[W, list[float]]] = {}

    def pin(self, way: W) -> None:
        """Use ``way`` from now on, whatever the key (its errors propagate)."""
        self.ways, self.ruled_out = (way,), []
        self._chosen.clear()
        self._times.clear()

    def chosen(self, key: Hashable = None) -> W | None:
        """The way kept for ``key`` (``None`` while undecided)."""
        remaining = self._remaining()
        if len(remaining) == 1:
            return remaining[0]
        return self._chosen.get(None if self.trials == 0 else key)

    def _remaining(self) -> list[W]:
        return [w for w in self.ways if w not in self.ruled_out]

    def __call__(
        self, compute: Callable[[W], T], generator: torch.Generator | None = None, key: Hashable = None
    ) -> T:
        key = None if self.trials == 0 else key
        state = generator.get_state() if generator is not None else None
        while True:
            remaining = self._remaining()
            way = self._chosen.get(key)
            if way is None or way in self.ruled_out:
                if len(remaining) == 1:
                    return compute(remaining[0])
                way = self._next_trial(key, remaining)
            timed = self.trials > 0 and key not in self._chosen  # a trial: its time decides
            if timed:
                synchronize()
            start = time.perf_counter()
            try:
                result = compute(way)
                if timed:
                    synchronize()
            except self.errors:
                self.ruled_out.append(way)
                if key in self._chosen and self._chosen[key] == way:
                    del self._chosen[key]
                if state is not None:
                    generator.set_state(state)
                continue
            self._record(key, way, time.perf_counter() - start, remaining)
            return result

    def _next_trial(self, key: Hashable, remaining: list[W]) -> W:
        """The remaining way with the fewest timed calls for ``key`` (the preferred on ties)."""
        times = self._times.setdefault(key, {})
        return min(remaining, key=lambda w: len(times.get(w, ())))

    def _record(self, key: Hashable, way: W, seconds: float, remaining: list[W]) -> None:
        if key in self._chosen:
            return
        if self.trials == 0:
            self._chosen[key] = way
            return
        times = self._times.setdefault(key, {})
        times.setdefault(way, []).append(seconds)
        if all(len(times.get(w, ())) >= self.trials for w in remaining):
            self._chosen[key] = min(remaining, key=lambda w: min(times[w]))


def strategy_choice(
    strategy: str, ways: Sequence[str], errors: tuple[type[BaseException], ...] = (RuntimeError,)
) -> Choice[str, T]:
    """The :class:`Choice` behind an estimator's ``strategy`` option.

    Args:
        strategy: ``"auto"`` (time ``ways`` on the first products, per key, and
            keep the fastest; a way that fails is ruled out) or one of ``ways``
            (pinned: every product takes it, and its errors propagate).
        ways: The estimator's ways, preferred first.
        errors: The exceptions that rule a way out under ``"auto"``.

    Raises:
        CurvkitError: ``strategy`` is neither ``"auto"`` nor one of ``ways``.
    """
    if strategy != "auto" and strategy not in ways:
        raise CurvkitError(f"unknown strategy {strategy!r}; use one of {['auto', *ways]}")
    choice: Choice[str, T] = Choice(ways, errors=errors, trials=AUTO_TRIALS)
    if strategy != "auto":
        choice.pin(strategy)
    return choice


def synchronize() -> None:
    """Wait for queued GPU work where CUDA is in use: a timed call then counts its kernels, not their launch.

    :class:`Choice` synchronises around its timed trials only (the first
    ``2 * trials`` calls per key); the calls after the choice run unsynchronised.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
