"""The plugin author's guide (docs/plugins.md) runs as written, and its example conforms."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit.testing import check_estimator, dense_hessian_reference, get_case
from curvkit.testing.reference import REFERENCES

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def example(python_blocks):
    """The guide's plugin module, registered for these tests."""
    block = python_blocks(GUIDE)[0]
    assert block.source.startswith("# my_package/curvkit_plugin.py")
    module = types.ModuleType("docs_subsampled_ggn")
    exec(block.compile(), module.__dict__)  # noqa: S102 - our own docs
    curvkit.register_plugin(module, name="docs-example")
    yield module
    curvkit.unregister_plugin(name="docs-example")


def test_the_guides_estimator_is_registered_with_its_options(example):
    spec = curvkit.get_estimator("subsampled-ggn")
    assert spec.plugin == "docs-example" and spec.flags["stochastic"] and spec.reference == "ggn"
    problem = get_case("tanh-mlp-ce").problem()
    op = curvkit.curvature("subsampled-ggn", problem, keep=0.25, seed=3)
    assert op.options == {"keep": 0.25, "seed": 3} and op.restrict("0").keep == 0.25
    with pytest.raises(curvkit.UnknownOptionError, match="its options: keep, seed"):
        curvkit.curvature("subsampled-ggn", problem, kepp=0.5)
    with pytest.raises(curvkit.CurvkitError, match=r"keep must be in \(0, 1\]"):
        curvkit.curvature("subsampled-ggn", problem, keep=2.0)
    # keep=1 keeps every sample: exactly the GGN
    full = curvkit.curvature("subsampled-ggn", problem, keep=1.0, seed=0).to_dense()
    torch.testing.assert_close(full, REFERENCES["ggn"](problem), rtol=1e-10, atol=1e-12)


def test_the_guides_estimator_passes_the_battery_in_expectation(example):
    cases = [get_case("tanh-mlp-ce"), get_case("dropout-batchnorm-mse"), get_case("tied-weights-mse")]
    report = check_estimator("subsampled-ggn", cases)
    report.raise_on_failure()
    reference = {r.case: r for r in report.results if r.check == "reference"}
    assert all(r.passed for r in reference.values()) and len(reference) == 3


def test_the_battery_catches_a_biased_variant_of_the_guides_estimator(example):
    class Unweighted(example.SubsampledGGN):  # forgets the 1 / keep: half the GGN in expectation
        def batch_product(self, params, inputs, targets, V, generator):
            parts, count = super().batch_product(params, inputs, targets, V, generator)
            return [self.keep * part for part in parts], count

    report = check_estimator(Unweighted, [get_case("tanh-mlp-ce")], reference="ggn")
    assert {r.check for r in report.failures} == {"reference"}


def test_the_guides_check_snippet_runs(example, python_blocks):
    snippet = python_blocks(GUIDE)[1].source
    assert 'check_estimator("subsampled-ggn")' in snippet
    namespace: dict = {}
    exec(compile(snippet.replace("print(report)", ""), str(GUIDE), "exec"), namespace)  # noqa: S102
    assert namespace["report"].passed


def test_the_readme_plugin_example_runs_and_passes_the_readmes_check(python_blocks):
    blocks = python_blocks(GUIDE.parents[1] / "README.md")
    plugin = next(block for block in blocks if "my_package/curvkit_plugin.py" in block.source)
    check = next(block for block in blocks if 'check_estimator("half-hessian")' in block.source)
    module = types.ModuleType("readme_half_hessian")
    exec(plugin.compile(), module.__dict__)  # noqa: S102 - our own docs
    curvkit.register_plugin(module, name="readme-example")
    try:
        problem = get_case("mlp-mse").problem()
        half = curvkit.curvature("half-hessian", problem).to_dense()
        torch.testing.assert_close(half, 0.5 * dense_hessian_reference(problem), rtol=1e-10, atol=1e-12)
        exec(check.compile(), {})  # noqa: S102 - raises on a failed check
    finally:
        curvkit.unregister_plugin(name="readme-example")
