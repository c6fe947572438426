"""The training scripts of docs/train_optimizers.py run, one per optimizer family, and train."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "train_optimizers.py"


@pytest.fixture(scope="module")
def scripts():
    spec = importlib.util.spec_from_file_location("train_optimizers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "family",
    [
        "kfac",
        "hessian-free",
        "natural-gradient",
        "adahessian",
        "shampoo",
        "preconditioned-sgd",
        "newton-summary",
    ],
)
def test_each_family_trains_the_digits_mlp(scripts, family):
    before, after = scripts.SCRIPTS[family](30)
    assert after < 0.8 * before, f"{family}: {before:.3f} -> {after:.3f}"


def test_the_script_lists_every_family_and_runs_from_the_command_line(scripts, capsys):
    scripts.main(["--steps", "2", "--only", "shampoo"])
    assert "shampoo" in capsys.readouterr().out
