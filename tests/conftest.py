"""Shared test configuration.

Tiny models run faster on one thread than on two (thread start-up dominates), and
the suite must stay quick on CI's 2 cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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


class _TestEstimators:
    """A third-party plugin for the tests of ``curvkit analyze``: estimators built on the Hessian.

    * ``scaled-hessian``: ``factor * H`` (default 1.5), reference ``"hessian"``: it
      fails the agreement check unless ``factor=1``;
    * ``shifted-hessian``: ``H + diag(d)`` with ``d`` a ramp from 0 to ``shift``:
      other eigenvalues, eigenvectors and trace than the Hessian's;
    * ``dense-hessian``: the Hessian, with a callable (dense) reference.
    """

    @staticmethod
    def _operators():
        import curvkit

        class ScaledHessian(curvkit.ProblemOperator):
            SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, False, False

            def __init__(self, problem, factor=1.5):
                super().__init__(problem)
                self.factor = factor
                self.hessian = curvkit.curvature("hessian", problem)

            def _product(self, M, snapshot):
                return self.factor * self.hessian.matmat(M)

        class ShiftedHessian(curvkit.ProblemOperator):
            SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, False, False

            def __init__(self, problem, shift=0.05):
                super().__init__(problem)
                self.hessian = curvkit.curvature("hessian", problem)
                self.ramp = torch.linspace(0, shift, problem.dim, dtype=problem.dtype, device=problem.device)

            def _product(self, M, snapshot):
                return self.hessian.matmat(M) + self.ramp[:, None] * M

        return ScaledHessian, ShiftedHessian

    @classmethod
    def make(cls):
        import curvkit
        from curvkit.testing import dense_hessian_reference

        scaled, shifted = cls._operators()
        plugin = type(sys)("test_estimators")

        @curvkit.hookimpl
        def curvkit_register_estimators():
            return [
                curvkit.EstimatorSpec("scaled-hessian", scaled, "factor * H", reference="hessian"),
                curvkit.EstimatorSpec("shifted-hessian", shifted, "H + diag(ramp)", reference="hessian"),
                curvkit.EstimatorSpec(
                    "dense-hessian",
                    lambda problem: curvkit.curvature("hessian", problem),
                    "H, checked against a dense matrix",
                    reference=dense_hessian_reference,
                ),
            ]

        plugin.curvkit_register_estimators = curvkit_register_estimators
        return plugin


@pytest.fixture(scope="module")
def test_estimators():
    """Registers :class:`_TestEstimators` for a module's tests (its name: ``test-estimators``)."""
    import curvkit

    name = curvkit.register_plugin(_TestEstimators.make(), name="test-estimators")
    yield name
    curvkit.unregister_plugin(name=name)


# --------------------------------------------------------------------------- the docs' code blocks

_MARKER = re.compile(r"<!--\s*(?:not run:(?P<not_run>.*?)|tested in (?P<tested_in>\S+?))\s*-->")


@dataclass(frozen=True)
class DocBlock:
    """One ```` ```python ```` block of a Markdown file.

    An HTML comment on the last non-blank line before the opening fence says how the
    block is tested when not by ``tests/test_docs_examples.py``:
    ``<!-- not run: REASON -->`` (it cannot run in a CPU-only single process: a GPU,
    ``torchrun``, a user's own files) or ``<!-- tested in tests/FILE.py -->`` (that
    module runs it).

    Attributes:
        path: The Markdown file.
        line: The line of the block's first line of code (1-based).
        source: The code, ending with a newline.
        not_run: The REASON of a ``not run`` marker (``""`` when empty), or ``None``.
        tested_in: The test module a ``tested in`` marker names, relative to the
            repository root, or ``None``.
    """

    path: Path
    line: int
    source: str
    not_run: str | None = None
    tested_in: str | None = None

    @property
    def location(self) -> str:
        """``FILE.md:LINE``, the file relative to the repository root."""
        return f"{self.path.resolve().relative_to(REPO)}:{self.line}"

    def compile(self):
        """The block's code object, whose tracebacks give the Markdown file and its lines."""
        padded = "\n" * (self.line - 1) + self.source
        return compile(padded, str(self.path.resolve().relative_to(REPO)), "exec")


def _python_blocks(path: Path) -> list[DocBlock]:
    """The ```` ```python ```` blocks of a Markdown file, in order, with their markers.

    Raises:
        ValueError: A block without its closing fence.
    """
    lines = Path(path).read_text().splitlines()
    blocks = []
    for start, line in enumerate(lines):
        if line.strip() != "```python":
            continue
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{start + 1}: a ```python block without its closing fence")
        before = next((text.strip() for text in reversed(lines[:start]) if text.strip()), "")
        marker = _MARKER.fullmatch(before)
        not_run = marker["not_run"] if marker else None
        blocks.append(
            DocBlock(
                path=Path(path),
                line=start + 2,
                source="\n".join(lines[start + 1 : end]) + "\n",
                not_run=None if not_run is None else not_run.strip(),
                tested_in=marker["tested_in"] if marker else None,
            )
        )
    return blocks


@pytest.fixture(scope="session")
def python_blocks():
    """``python_blocks(path)``: the ```` ```python ```` blocks of a Markdown file, as
    :class:`DocBlock` objects, in order."""
    return _python_blocks
