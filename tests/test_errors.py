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
