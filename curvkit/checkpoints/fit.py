"""Putting a ``state_dict`` into a model: wrapper prefixes, Lightning attributes, strictness, NaN."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.checkpoints._text import counted, exc_line, listing
from curvkit.checkpoints._types import CheckpointError

_RETRAIN_HINT = "pass the --model and --model-kwargs the checkpoint was trained with"


def _components(key: str) -> list[str]:
    return key.split(".")


def strip_wrappers(state: Mapping[str, Any], expected: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Remove ``_orig_mod.`` (torch.compile, anywhere) and leading ``module.`` (DDP) from keys."""
    notes = []
    state = dict(state)
    has_orig = any("_orig_mod" in _components(k) for k in state)
    if has_orig and not any("_orig_mod" in _components(k) for k in expected):
        state = {".".join(p for p in _components(k) if p != "_orig_mod"): v for k, v in state.items()}
        notes.append("stripped torch.compile's '_orig_mod.' from the keys")
    depth = 0
    while (
        state
        and all(k.startswith("module.") for k in state)
        and not all(k.startswith("module.") for k in expected)
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}
        depth += 1
    if depth:
        notes.append(f"stripped the wrapper prefix 'module.' (DistributedDataParallel/DataParallel) x{depth}")
    return state, notes


def select_submodule(state: Mapping[str, Any], expected: set[str]) -> tuple[dict[str, Any], list[str]]:
    """For a LightningModule's state_dict: the entries of the attribute holding the model."""
    state = dict(state)
    best, best_score = "", len(set(state) & expected)
    for prefix in sorted({k.split(".", 1)[0] for k in state if "." in k}, key=lambda p: (p != "model", p)):
        sub = {k[len(prefix) + 1 :] for k in state if k.startswith(prefix + ".")}
        score = len(sub & expected)
        if score > best_score:
            best, best_score = prefix, score
    if not best:
        return state, []
    kept = {k[len(best) + 1 :]: v for k, v in state.items() if k.startswith(best + ".")}
    dropped = [k for k in state if not k.startswith(best + ".")]
    notes = [f"took the LightningModule's {best!r} attribute (prefix '{best}.')"]
    if dropped:
        notes.append(f"ignored {len(dropped)} other LightningModule entries: {listing(dropped)}")
    return kept, notes


def fit_weights(
    net: nn.Module, state: Mapping[str, Any], path: Path, source: str, strict: bool
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``net``; return ``(missing, unexpected)`` keys.

    Raises:
        CheckpointError: Shape mismatches, or (with ``strict``) missing or
            unexpected keys: one line listing them, suggesting ``--no-strict``
            when only missing or unexpected keys are the problem.
    """
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected
        and isinstance(v, Tensor)
        and isinstance(expected[k], Tensor)
        and v.shape != expected[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{counted(len(missing), 'missing key')} ({listing(missing)})")
        if unexpected:
            parts.append(f"{counted(len(unexpected), 'unexpected key')} ({listing(unexpected)})")
        if shapes:
            parts.append(f"{counted(len(shapes), 'shape mismatch')} (checkpoint {listing(shapes, 3)})")
        if shapes:
            fix = _RETRAIN_HINT
        elif missing:
            fix = (
                f"{_RETRAIN_HINT}, or --no-strict (strict=False) to keep the model's initial values "
                "for the missing keys"
            )
        else:
            fix = (
                "if the model does not need them (a loss's parameters, metrics), pass --no-strict "
                f"(strict=False) to ignore them; else {_RETRAIN_HINT}"
            )
        raise CheckpointError(
            f"the weights in {path} do not fit the model {source}: {'; '.join(parts)}; {fix}"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {path} do not fit the model {source} ({exc_line(exc)}); {_RETRAIN_HINT}"
        ) from exc
    return missing, unexpected


def check_finite_weights(net: nn.Module, path: Path) -> None:
    """Raise a one-line error naming the parameters and buffers holding NaN or Inf."""
    bad = []
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            counts = ", ".join(c for c in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if c)
            bad.append(f"{name} ({counts})")
    if bad:
        raise CheckpointError(
            f"{path} has non-finite weights in {listing(bad)}; the run that saved it diverged: "
            "analyse an earlier checkpoint"
        )
