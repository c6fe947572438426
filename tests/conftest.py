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
