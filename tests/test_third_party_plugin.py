"""A third-party plugin installed as a real distribution, loaded from its entry point.

The distribution (a module and its ``.dist-info`` with an entry point in the
``curvkit`` group) is written to a temporary directory and put on ``PYTHONPATH``
of a fresh interpreter, since entry points are read once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_SOURCE = '''
"""A third-party curvkit plugin: twice the Hessian, and a placeholder identity."""

import curvkit
from curvkit.testing import dense_hessian_reference


class DoubleHessian(curvkit.ProblemOperator):
    """Twice the Hessian of the problem, through curvkit's public API only."""

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, True, False

    def __init__(self, problem, factor=2.0):
        super().__init__(problem)
        self.factor = factor
        self.hessian = curvkit.curvature("hessian", problem)

    def _product(self, M, snapshot):
        return self.factor * self.hessian.matmat(M)


class OnesDiagonal(curvkit.ProblemOperator):
    """The identity: a diagonal of ones."""

    PSD, EXACT = True, False

    def _product(self, M, snapshot):
        return M.clone()


def double_hessian_reference(problem):
    return 2.0 * dense_hessian_reference(problem)


@curvkit.hookimpl
def curvkit_register_estimators():
    return [
        curvkit.EstimatorSpec(
            name="double-hessian",
            factory=DoubleHessian,
            description="Twice the Hessian (a third-party example).",
            reference=double_hessian_reference,
        ),
        curvkit.EstimatorSpec(name="ones-diagonal", factory=OnesDiagonal, description="A diagonal of ones."),
    ]
'''

METADATA = "Metadata-Version: 2.1\nName: my_curvkit_plugin\nVersion: 0.3.0\nSummary: test plugin\n"

PROBE = r"""
import json, torch, curvkit
from curvkit.testing import dense_hessian_reference, get_case

result = {
    "estimators": {s.name: [s.plugin, s.flags] for s in curvkit.estimators()},
    "plugins": {p.name: [p.version, p.builtin, list(p.estimators)] for p in curvkit.loaded_plugins()},
}
if "double-hessian" in result["estimators"]:
    problem = get_case("tanh-mlp-ce").problem()
    truth = dense_hessian_reference(problem)
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H2 = curvkit.curvature("double-hessian", problem)
    result["error"] = ((H2 @ v) - 2.0 * truth @ v).norm().item() / (truth @ v).norm().item()
    result["error-factor"] = (
        (curvkit.curvature("double-hessian", problem, factor=-1.0) @ v) + truth @ v
    ).norm().item() / (truth @ v).norm().item()
    ones = curvkit.curvature("ones-diagonal", problem)
    result["ones"] = torch.equal(ones.to_dense(), torch.eye(problem.dim, dtype=torch.float64))
print("RESULT " + json.dumps(result))
"""

CONFORMANCE = r"""
from curvkit.testing import check_estimator
for name in ("double-hessian", "ones-diagonal"):
    report = check_estimator(name)  # every case of curvkit.testing.CASES
    checks = {r.check for r in report.results if r.status != "skipped"}
    report.raise_on_failure()
    print(name, "checks:", " ".join(sorted(checks)))
"""


def make_distribution(root: Path, module: str = "my_curvkit_plugin", source: str = PLUGIN_SOURCE) -> Path:
    """Write ``module.py`` and its dist-info with an entry point ``mine`` in the ``curvkit`` group."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(METADATA.replace("my_curvkit_plugin", module))
    (info / "entry_points.txt").write_text(f"[curvkit]\nmine = {module}\n")
    return root


def plugin_env(path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CURVKIT_")}
    env["PYTHONPATH"] = str(path)
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "250"
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # cwd away from the checkout, so the installed curvkit (not the source folder) is imported
    cwd = env["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    return make_distribution(tmp_path_factory.mktemp("site"))


def test_entry_point_plugin_is_loaded_with_its_version(dist):
    result = _result(run_python(PROBE, plugin_env(dist)))
    estimators = result["estimators"]
    assert estimators["double-hessian"][0] == "mine"
    assert estimators["ones-diagonal"] == [
        "mine",
        {"symmetric": True, "psd": True, "exact": False, "stochastic": False, "resamples": False},
    ]
    assert estimators["hessian"][0] == "curvkit.plugins.hessian"
    version, builtin, names = result["plugins"]["mine"]
    assert version == "0.3.0" and builtin is False
    assert sorted(names) == ["double-hessian", "ones-diagonal"]
    assert result["plugins"]["curvkit.plugins.hessian"][1] is True
    # its estimators work through curvkit.curvature
    assert result["error"] < 1e-10
    assert result["error-factor"] < 1e-10
    assert result["ones"] is True


def test_autoload_can_be_disabled(dist):
    result = _result(run_python(PROBE, plugin_env(dist, CURVKIT_DISABLE_PLUGIN_AUTOLOAD="1")))
    assert "double-hessian" not in result["estimators"]
    assert "mine" not in result["plugins"]
    assert "hessian" in result["estimators"]  # built-ins are not autoloaded, always there


def test_command_line_lists_the_plugin(dist, curvkit_command):
    proc = subprocess.run(
        [*curvkit_command, "plugins"], env=plugin_env(dist), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("double-hessian", "ones-diagonal", "mine", "0.3.0", "hessian", "curvkit.plugins.hessian"):
        assert text in out, text
    line = next(line for line in out.splitlines() if "double-hessian" in line)
    assert "mine" in line and "0.3.0" in line


def test_conformance_battery_passes_on_the_plugin(dist):
    proc = run_python(CONFORMANCE, plugin_env(dist))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" checks: ") for line in proc.stdout.splitlines() if " checks: " in line)
    assert "reference" in lines["double-hessian"].split()  # the plugin's own reference was used
    assert "psd" in lines["ones-diagonal"].split()
    assert "reference" not in lines["ones-diagonal"].split()  # not EXACT, no reference


def test_conformance_battery_catches_a_wrong_plugin(tmp_path):
    wrong = PLUGIN_SOURCE.replace(
        "return self.factor * self.hessian.matmat(M)", "return self.hessian.matmat(M)"
    )
    make_distribution(tmp_path, source=wrong)
    code = CONFORMANCE.replace('("double-hessian", "ones-diagonal")', '("double-hessian",)')
    proc = run_python(code, plugin_env(tmp_path))
    assert proc.returncode != 0
    assert "fails conformance" in proc.stderr and "reference" in proc.stderr
