"""The one-line helpers every module words its errors with (``curvkit.errors``)."""

from __future__ import annotations

import re
from pathlib import Path

from curvkit.errors import describe_error, first_line, one_line

ROOT = Path(__file__).resolve().parents[1]


def test_one_line_collapses_whitespace_and_cuts_at_the_limit():
    assert one_line("a\n  b\tc ") == "a b c" and one_line(ValueError("x\ny")) == "x y"
    assert one_line("abcdefghij", 8) == "abcde..." and one_line("abcdefgh", 8) == "abcdefgh"


def test_first_line_is_the_first_line_of_the_message_without_colours():
    assert first_line(RuntimeError("\n  \x1b[31mshapes differ\x1b[0m  \nat line 3")) == "shapes differ"
    assert first_line(RuntimeError()) == "" and first_line(KeyError("k")) == "'k'"


def test_describe_error_gives_type_and_message_or_interrupted():
    assert describe_error(ValueError("bad\n value")) == "ValueError: bad value"
    assert (
        describe_error(ValueError("bad\n value"), first_line(ValueError("bad\n value"))) == "ValueError: bad"
    )
    assert describe_error(OSError()) == "OSError" and describe_error(KeyboardInterrupt()) == "interrupted"


def test_no_module_keeps_its_own_copy_of_the_helpers():
    own = re.compile(r"^def _?(one_line|first_line|describe)\(\s*(exc|text)\b", re.MULTILINE)
    copies = [
        str(path.relative_to(ROOT))
        for folder in ("curvkit", "cli", "plugins")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "errors.py" and own.search(path.read_text())
    ]
    assert copies == []


def test_every_flag_a_remedy_names_is_a_flag_of_curvkit_analyze():
    """``curvkit.remedies`` spells the command line's flags without importing it: keep them in step."""
    import typer
    from curvkit.cli.main import app

    from curvkit.remedies import SETTINGS, option, setting

    analyze = typer.main.get_command(app).commands["analyze"]
    flags = {name for param in analyze.params for name in param.opts}
    named = {cli.split()[0] for cli, _ in SETTINGS.values()} | {option("kfac", "seed", 0).split()[0]}
    assert named <= flags, named - flags
    assert setting("tol", 8e-07) == "--tol 8e-07 (tol=8e-07)"


def test_selecting_no_parameter_names_both_spellings_of_the_remedy():
    import pytest
    import torch

    from curvkit.errors import ParameterSelectionError
    from curvkit.layout import select_parameters

    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ParameterSelectionError) as exc:
        select_parameters(frozen, None)
    assert "with --params NAMES (params=NAMES)" in str(exc.value)
    assert "with --params all (params='all')" in str(exc.value)
    assert [name for name, _ in select_parameters(frozen, "all")] == ["weight", "bias"]
