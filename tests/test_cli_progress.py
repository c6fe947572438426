"""Progress bars of ``curvkit analyze`` on a real terminal (a tmux pane), and their absence.

Rich draws bars only on a terminal; under ``subprocess`` or ``CliRunner`` stderr is a
pipe, so these tests run the installed console script inside a detached tmux session
and read the screen with ``tmux capture-pane`` while it works.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid

import pytest

from curvkit.datasets import bundled_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a terminal"),
]

MLP = str(bundled_file("digits_mlp.pt"))
ANALYSES = ["--top-k", "5", "--trace", "hutchinson", "--trace-matvecs", "1500"]
DONE = "CURVKIT-EXIT="


def _screens(tmp_path, command: list[str], env: dict[str, str]) -> list[str]:
    """Run ``command`` in a 200x50 tmux pane; every screen seen until it exits, last one last."""
    script = tmp_path / "run.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
    script.write_text(
        f"{exports}cd {shlex.quote(str(tmp_path))}\n{shlex.join(command)}\necho {DONE}$?\nsleep 60\n"
    )
    socket = f"curvkit-test-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket]
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", "200", "-y", "50", "bash", str(script)], check=True, timeout=30
    )
    screens: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            shown = subprocess.run(
                [*tmux, "capture-pane", "-p"], capture_output=True, text=True, timeout=30
            ).stdout
            screens.append(shown)
            if DONE in shown:
                return screens
            time.sleep(0.1)
        raise AssertionError("analyze did not finish in a tmux pane: " + screens[-1])
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)


def _bar_lines(screen: str) -> list[str]:
    return [line for line in screen.splitlines() if "digits_mlp.pt [hessian]" in line]


def test_progress_bars_on_a_terminal(tmp_path, curvkit_command, script_env):
    screens = _screens(tmp_path, [*curvkit_command, "analyze", MLP, *ANALYSES, "-o", "r.h5"], script_env)
    final = screens[-1]
    assert f"{DONE}0" in final, final
    bars = [line for screen in screens[:-1] for line in _bar_lines(screen)]
    # a bar per run, with the counters of the analysis at work and the elapsed time
    assert any("trace/hutchinson" in line and "matvecs=" in line for line in bars), screens
    assert any("━" in line for line in bars)
    # the bars are transient: the final screen holds the summary, not a bar
    assert not [line for line in _bar_lines(final) if "matvecs=" in line or "━" in line], final
    assert "digits_mlp.pt [hessian] P=3,466 -> r.h5" in final  # names print literally, not as markup
    assert "eigen/largest: [" in final and "trace/hutchinson: " in final


def test_quiet_draws_nothing_on_a_terminal(tmp_path, curvkit_command, script_env):
    screens = _screens(
        tmp_path, [*curvkit_command, "analyze", MLP, *ANALYSES, "-o", "r.h5", "--quiet"], script_env
    )
    assert f"{DONE}0" in screens[-1]
    text = "\n".join(screens)
    assert "matvecs=" not in text and "━" not in text and "eigen/largest" not in text
