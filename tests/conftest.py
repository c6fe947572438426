"""Shared test configuration.

Tiny models run faster on one thread than on two (thread start-up dominates), and
the suite must stay quick on CI's 2 cores.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def curvkit_command() -> list[str]:
    """The installed ``curvkit`` console script next to this interpreter (or the module)."""
    script = shutil.which("curvkit", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "curvkit.cli.main"]


@pytest.fixture
def script_env() -> dict[str, str]:
    """Environment for a subprocess: no ``CURVKIT_*`` settings of the caller, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CURVKIT_")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def run_curvkit(curvkit_command, script_env):
    """``run_curvkit(*args, cwd=...)``: the console script in a subprocess, output captured."""

    def run(*args: str, cwd) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*curvkit_command, *args], capture_output=True, text=True, cwd=cwd, env=script_env, timeout=300
        )

    return run
