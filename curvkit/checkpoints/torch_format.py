"""``torch.save`` files, zip and legacy (before torch 1.6), loaded with ``weights_only=True``."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from curvkit.checkpoints._text import exc_line
from curvkit.checkpoints._types import CheckpointError, CheckpointLoader, corrupt_file_error
from curvkit.checkpoints.detect import detector
from curvkit.errors import CurvkitError

__all__ = ["LOADER"]


def pickle_refusal(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a file that ``weights_only=True`` refuses: it holds arbitrary Python objects."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    found = f" (such as {match.group(1)})" if match else ""
    return CheckpointError(
        f"{path} holds pickled Python objects{found}, e.g. a whole model saved with torch.save(model): "
        "loading it would execute arbitrary code from the file; pass --trust-pickle (trust_pickle=True) "
        "only for files you trust, or save model.state_dict() or use curvkit.save_checkpoint"
    )


def is_weights_only_refusal(exc: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a valid pickle that imports Python objects."""
    msg = str(exc)
    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in msg and "GLOBAL " in msg


def load_torch(path: Path, *, map_location: torch.device, trust_pickle: bool, **_: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the user trusts pickles."""
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except CurvkitError:
        raise
    except Exception as exc:
        if is_weights_only_refusal(exc):
            raise pickle_refusal(path, exc) from exc
        if trust_pickle and isinstance(exc, (AttributeError, ImportError)):
            raise CheckpointError(
                f"{path} is a pickle whose classes cannot be imported here ({exc_line(exc)}); run where "
                "the model's code is importable, or save model.state_dict() instead"
            ) from exc
        raise corrupt_file_error(path, "torch.save file", exc) from exc


LOADER = CheckpointLoader(
    name="torch",
    detect=detector("torch"),
    load=load_torch,
    description="torch.save files: state_dicts, checkpoint dicts, Lightning .ckpt",
)
"""The built-in loader of ``torch.save`` files."""
