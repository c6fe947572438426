"""How a message names a setting that would help, in both spellings its readers use.

A warning or error of the library reaches Python callers and, through ``curvkit
analyze``, users of the command line, who set the same thing with a flag. The
core does not know the command line (it never imports ``cli/``), and a message
may be stored in a results file and read in the other setting, so a remedy
names both spellings: the flag, then the Python spelling in parentheses, as in
``--trust-pickle (trust_pickle=True)``. The flags are written here, once
(``tests/test_errors.py`` checks that ``curvkit analyze`` has them):

    >>> setting("dtype", "float64")
    '--dtype float64 (problem.to(torch.float64))'
    >>> setting("tol", 8e-07)
    '--tol 8e-07 (tol=8e-07)'
    >>> setting("params", "all")
    "--params all (params='all')"
    >>> setting("params", "NAMES", python="NAMES")  # a placeholder
    '--params NAMES (params=NAMES)'
    >>> option("kfac", "unsupported", "skip")
    "--option kfac.unsupported=skip (unsupported='skip')"
"""

from __future__ import annotations

from typing import Any

__all__ = ["SETTINGS", "option", "setting"]

SETTINGS: dict[str, tuple[str, str]] = {
    "dtype": ("--dtype {value}", "problem.to(torch.{value})"),
    "tol": ("--tol {value}", "tol={python}"),
    "params": ("--params {value}", "params={python}"),
}
"""Setting -> (command-line spelling, Python spelling), formatted with ``value`` (as ``str``)
and ``python`` (the value as Python writes it)."""


def setting(name: str, value: Any, python: str | None = None) -> str:
    """A setting of :data:`SETTINGS` with its value, as the command line and as Python spell it.

    Args:
        name: ``"dtype"``, ``"tol"``, ``"params"``.
        value: Its value (``"float64"``, ``8e-07``, ``"all"``), or a placeholder (``"NAMES"``).
        python: The value as Python writes it; default its ``repr`` (give the
            placeholder itself for a placeholder).

    Raises:
        KeyError: An unknown setting (a message names one that is not in the table).
    """
    cli, spelled = SETTINGS[name]
    python = repr(value) if python is None else python
    return f"{cli.format(value=value)} ({spelled.format(value=value, python=python)})"


def option(estimator: str, name: str, value: Any) -> str:
    """An estimator's option: ``--option ESTIMATOR.NAME=VALUE`` on the command line, ``NAME=VALUE`` in Python.

    Args:
        estimator: The estimator's registered name (``"kfac"``).
        name: The option (``"unsupported"``).
        value: Its value (``"skip"``); the Python spelling is its ``repr``.
    """
    return f"--option {estimator}.{name}={value} ({name}={value!r})"
