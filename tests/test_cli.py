"""The ``curvkit`` command line: in process with Typer's CliRunner, and as the installed script."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import typer
from curvkit.cli import main as cli_main
from curvkit.cli.main import app
from typer.testing import CliRunner

import curvkit

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


def _commands(group, prefix: tuple[str, ...] = ()):
    """Every command of the app (a click-like group), with its path, sub-groups included."""
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if hasattr(command, "commands"):  # a sub-group (typer vendors its own click)
            yield from _commands(command, (*prefix, name))


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert f"curvkit {curvkit.__version__}" in result.output
    assert torch.__version__ in result.output


def test_plugins_lists_the_builtins():
    result = runner.invoke(app, ["plugins"], env=WIDE)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("hessian", "exact-hessian"):
        row = next(line for line in lines if f" {name} " in line)
        assert "curvkit.plugins.hessian" in row and curvkit.__version__ in row
        assert "symmetric" in row and "exact" in row and "psd" not in row
        assert curvkit.get_estimator(name).description[:30] in row


def test_plugins_shows_a_run_time_plugin():
    module = type(sys)("cli_test_plugin")

    @curvkit.hookimpl
    def curvkit_register_estimators():
        return [
            curvkit.EstimatorSpec(
                "cli-identity",
                lambda p: curvkit.IdentityOperator(p.layout, dtype=p.dtype, device=p.device),
                description="Identity for the CLI test.",
                flags={"psd": True},
            )
        ]

    module.curvkit_register_estimators = curvkit_register_estimators
    curvkit.register_plugin(module, name="cli-test")
    try:
        result = runner.invoke(app, ["plugins"], env=WIDE)
    finally:
        curvkit.unregister_plugin(module)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "cli-identity" in line)
    assert "cli-test" in row and "psd" in row and "Identity for the CLI test." in row


def test_every_command_has_help_text():
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert [path for path, _ in commands if path == ("plugins",)]
    top = runner.invoke(app, ["--help"], env=WIDE)
    assert top.exit_code == 0 and "Curvature of PyTorch models" in top.output
    for param in root.params:
        if param.param_type_name == "option":
            assert (param.help or "").strip(), f"option {param.name} of curvkit has no help"
    for path, command in commands:
        assert (command.help or "").strip(), f"{' '.join(path)} has no help text"
        result = runner.invoke(app, [*path, "--help"], env=WIDE)
        assert result.exit_code == 0, result.output
        assert command.help.strip().splitlines()[0][:40] in " ".join(result.output.split())
        if len(path) == 1:
            assert path[0] in top.output
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "hidden", False):
                assert (param.help or "").strip(), f"option {param.name} of {' '.join(path)} has no help"


TYPE_LABEL = re.compile(r"<(bool|int|float|str|path|list\[\w+\])>|\{[a-z_]+\}")
"""How Typer labelled values by their type hints, and a required argument in the usage line."""


def test_the_help_names_values_as_click_does():
    """Not ``--top-k <int>``, ``<bool>`` after every flag, ``{checkpoints}...`` in the usage line."""
    root = typer.main.get_command(app)
    for path in [(), *(path for path, _ in _commands(root))]:
        result = runner.invoke(app, [*path, "--help"], env=WIDE)
        assert result.exit_code == 0 and not TYPE_LABEL.search(result.output), (path, result.output)
    output = runner.invoke(app, ["analyze", "--help"], env=WIDE).output
    assert "analyze [OPTIONS] CHECKPOINTS..." in output
    assert "* CHECKPOINTS... Checkpoint files" in " ".join(output.split())
    rows = {line.split()[1]: line.split()[2:] for line in output.splitlines() if line.startswith("\u2502 --")}
    values = {option: rows[option][0] for option in ("--top-k", "--tol", "--curvature", "--params")}
    assert values == {"--top-k": "INTEGER", "--tol": "FLOAT", "--curvature": "TEXT", "--params": "TEXT"}
    assert rows["--output"][:2] == ["-o", "PATH"]
    assert rows["--density"][0] == "Spectral" and rows["--strict"][:2] == ["--no-strict", "Refuse"]
    assert rows["--help"][0] == "Show"
    assert "show [OPTIONS] RESULTS" in runner.invoke(app, ["show", "--help"], env=WIDE).output


def test_the_help_and_the_error_name_every_analysis_flag_and_when_top_k_defaults_to_5():
    """The analysis flags (those that replace the default analyses) as the help lists them are those
    that the error for a command asking for none lists, ``--summary`` included."""
    from curvkit.analysis import AnalysisPlan

    command = typer.main.get_command(app).commands["analyze"]
    listed = re.search(r"With no analysis flag \(([^)]*)\)", " ".join(command.help.split())).group(1)
    flags = listed.split(", ")
    assert "--summary" in flags and all(flag in {o for p in command.params for o in p.opts} for flag in flags)
    with pytest.raises(curvkit.CurvkitError) as err:
        AnalysisPlan(top_k=0, trace=None, density=False)
    assert str(err.value).endswith(f"ask for {', '.join(flags[:-1])} or {flags[-1]}")
    (top_k,) = [param for param in command.params if "--top-k" in param.opts]
    assert "(default 5 with no other analysis flag, or with --compare-to; else none)" in top_k.help


def test_library_errors_become_one_line_and_exit_status_2(monkeypatch, capsys):
    def broken():
        raise curvkit.DataError("the data yielded no batch")

    monkeypatch.setattr(curvkit, "estimators", broken)
    monkeypatch.setattr(sys, "argv", ["curvkit", "plugins"])
    with pytest.raises(SystemExit) as info:
        cli_main.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "curvkit: error: the data yielded no batch\n"


# --------------------------------------------------------------------------- installed script
BROKEN_PLUGINS = {
    "duplicate": (
        """
        import curvkit

        @curvkit.hookimpl
        def curvkit_register_estimators():
            return [curvkit.EstimatorSpec("hessian", lambda problem: None)]
        """,
        ["estimator 'hessian'", "'curvkit.plugins.hessian'", "'broken'"],
    ),
    "unknown-hook": (
        """
        import curvkit

        @curvkit.hookimpl
        def curvkit_typo():
            return []
        """,
        ["curvkit_typo"],
    ),
}


def _install_broken(root: Path, source: str) -> None:
    (root / "broken_curvkit_plugin.py").write_text(textwrap.dedent(source))
    info = root / "broken_curvkit_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken_curvkit_plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[curvkit]\nbroken = broken_curvkit_plugin\n")


@pytest.mark.parametrize("kind", list(BROKEN_PLUGINS))
def test_installed_script_reports_a_broken_plugin_in_one_line(tmp_path, kind, curvkit_command, script_env):
    source, fragments = BROKEN_PLUGINS[kind]
    _install_broken(tmp_path, source)
    env = {**script_env, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([*curvkit_command, "plugins"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("curvkit: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert proc.stdout == ""


def test_a_plugin_that_fails_to_import_is_listed_and_the_others_work(tmp_path, curvkit_command, script_env):
    _install_broken(tmp_path, 'raise ImportError("this plugin needs a package\\nthat is not installed")')
    env = {**script_env, "PYTHONPATH": str(tmp_path), "COLUMNS": "250"}
    proc = subprocess.run([*curvkit_command, "plugins"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (warning,) = proc.stderr.strip().splitlines()
    assert warning.startswith("curvkit: warning: curvkit plugin 'broken' of broken_curvkit_plugin 1.0")
    assert "(entry point broken = broken_curvkit_plugin)" in warning
    assert "this plugin needs a package that is not installed" in warning
    assert "CURVKIT_DISABLE_PLUGIN_AUTOLOAD=1" in warning
    row = next(line for line in proc.stdout.splitlines() if "BROKEN" in line)
    assert "broken_curvkit_plugin 1.0" in row and "ImportError" in row
    assert any(" hessian " in line for line in proc.stdout.splitlines())  # the built-ins still work
