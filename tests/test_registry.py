"""The estimator registry and run-time plugins.

Every test that registers a plugin unregisters it, so the global registry is left
as it was found.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
import torch

import curvkit
from curvkit.testing import dense_hessian_reference, get_case

DT = torch.float64
BUILTIN = "curvkit.plugins.hessian"
HESSIAN_FLAGS = {"symmetric": True, "psd": False, "exact": True, "stochastic": False, "resamples": False}


def _names() -> list[str]:
    return [s.name for s in curvkit.estimators()]


@pytest.fixture
def registry_guard() -> Iterator[None]:
    """Check that a test leaves the registry as it found it."""
    pm = curvkit.plugin_manager()
    plugins_before = sorted(name for name, _ in pm.list_name_plugin())
    names_before = _names()
    yield
    assert sorted(name for name, _ in pm.list_name_plugin()) == plugins_before
    assert _names() == names_before


def _plugin(name: str, specs_fn) -> types.ModuleType:
    """A module-like plugin whose curvkit_register_estimators returns ``specs_fn()``."""
    module = types.ModuleType(name)

    @curvkit.hookimpl
    def curvkit_register_estimators():
        return specs_fn()

    module.curvkit_register_estimators = curvkit_register_estimators
    return module


class ScaledHessian(curvkit.ProblemOperator):
    """``scale`` times the Hessian, through the public API only."""

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, False, True, False

    def __init__(self, problem: curvkit.Problem, scale: float = 3.0):
        super().__init__(problem)
        self.scale = scale
        self.hessian = curvkit.curvature("hessian", problem)

    def _product(self, M: torch.Tensor, snapshot: curvkit.ModelSnapshot) -> torch.Tensor:
        return self.scale * self.hessian.matmat(M)


# --------------------------------------------------------------------------- built-ins
def test_builtin_estimators_are_listed():
    specs = {s.name: s for s in curvkit.estimators()}
    assert {"hessian", "exact-hessian"} <= set(specs)
    assert _names() == sorted(_names())
    for name in ("hessian", "exact-hessian"):
        spec = specs[name]
        assert spec.plugin == BUILTIN
        assert spec.flags == HESSIAN_FLAGS
        assert spec.description and "\n" not in spec.description
        assert spec.reference == "hessian"
        assert curvkit.get_estimator(name) is spec
    plugins = {p.name: p for p in curvkit.loaded_plugins()}
    info = plugins[BUILTIN]
    assert info.builtin and info.version == curvkit.__version__
    assert set(info.estimators) == {"hessian", "exact-hessian"}


def test_builtins_compute_the_hessian():
    problem = get_case("mlp-mse").problem()
    truth = dense_hessian_reference(problem)
    for name in ("hessian", "exact-hessian"):
        op = curvkit.curvature(name, problem)
        assert isinstance(op, curvkit.CurvatureOperator)
        torch.testing.assert_close(op.to_dense(), truth, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- unknown names
def test_unknown_estimator_lists_names_and_suggests_a_close_match():
    with pytest.raises(curvkit.UnknownEstimatorError) as info:
        curvkit.get_estimator("hesian")
    message = str(info.value)
    assert "did you mean 'hessian'" in message
    assert "hessian" in message and "exact-hessian" in message
    assert "\n" not in message and not message.startswith(("'", '"'))
    assert isinstance(info.value, KeyError) and isinstance(info.value, curvkit.CurvkitError)

    problem = get_case("mlp-mse").problem()
    with pytest.raises(curvkit.UnknownEstimatorError) as info:
        curvkit.curvature("zzzz", problem)
    assert "did you mean" not in str(info.value)
    assert "available: d3, ekfac, empirical-fisher, exact-hessian, fisher, ggn, hessian, kfac" in str(
        info.value
    )


# --------------------------------------------------------------------------- run-time plugins
def test_register_and_unregister_a_plugin(registry_guard):
    plugin = _plugin(
        "test_scaled_plugin",
        lambda: [
            curvkit.EstimatorSpec(
                name="scaled-hessian",
                factory=ScaledHessian,
                description="Three times the Hessian.",
                reference=lambda p: 3.0 * dense_hessian_reference(p),
            )
        ],
    )
    name = curvkit.register_plugin(plugin, name="test-scaled")
    try:
        assert name == "test-scaled"
        spec = curvkit.get_estimator("scaled-hessian")
        assert spec.plugin == "test-scaled"
        assert spec.flags == HESSIAN_FLAGS  # read from the class
        assert "scaled-hessian" in _names()
        infos = {p.name: p for p in curvkit.loaded_plugins()}
        assert infos["test-scaled"].estimators == ("scaled-hessian",)
        assert not infos["test-scaled"].builtin

        problem = get_case("tanh-mlp-ce").problem()
        truth = dense_hessian_reference(problem)
        op = curvkit.curvature("scaled-hessian", problem)
        v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0), dtype=DT)
        torch.testing.assert_close(op @ v, 3.0 * truth @ v, rtol=1e-10, atol=1e-12)
        op = curvkit.curvature("scaled-hessian", problem, scale=-1.0)
        torch.testing.assert_close(op @ v, -truth @ v, rtol=1e-10, atol=1e-12)
        # a restricted block is the same estimator on fewer parameters
        block = op.restrict("2.bias")
        assert isinstance(block, ScaledHessian) and block.scale == -1.0
        torch.testing.assert_close(block.to_dense(), -truth[-3:, -3:], rtol=1e-10, atol=1e-12)
    finally:
        curvkit.unregister_plugin(plugin)
    assert "scaled-hessian" not in _names()
    with pytest.raises(curvkit.UnknownEstimatorError):
        curvkit.get_estimator("scaled-hessian")


def test_explicit_flags_and_plain_factories(registry_guard):
    def identity(problem, scale=1.0):
        return curvkit.IdentityOperator(problem.layout, scale, dtype=problem.dtype, device=problem.device)

    flags = {"symmetric": True, "psd": True, "exact": False, "stochastic": False, "resamples": False}
    plugin = _plugin("test_identity_plugin", lambda: [curvkit.EstimatorSpec("unit", identity, flags=flags)])
    curvkit.register_plugin(plugin)
    try:
        assert curvkit.get_estimator("unit").flags == flags
        problem = get_case("mlp-mse").problem()
        op = curvkit.curvature("unit", problem, scale=2.0)
        torch.testing.assert_close(op.to_dense(), 2.0 * torch.eye(problem.dim, dtype=DT))
    finally:
        curvkit.unregister_plugin(plugin)


def test_duplicate_estimator_names_both_plugins_and_rolls_back(registry_guard):
    plugin = _plugin(
        "test_duplicate_plugin",
        lambda: [
            curvkit.EstimatorSpec("fine-name", ScaledHessian),
            curvkit.EstimatorSpec("hessian", ScaledHessian),
        ],
    )
    with pytest.raises(curvkit.DuplicateEstimatorError) as info:
        curvkit.register_plugin(plugin, name="test-duplicate")
    message = str(info.value)
    assert "'hessian'" in message and BUILTIN in message and "test-duplicate" in message
    assert "\n" not in message
    assert isinstance(info.value, curvkit.PluginError)
    # rolled back: the plugin is gone, the built-in hessian still works
    assert not curvkit.plugin_manager().is_registered(plugin)
    assert "fine-name" not in _names()
    assert curvkit.get_estimator("hessian").plugin == BUILTIN
    assert curvkit.get_estimator("hessian").factory is not ScaledHessian


def test_duplicate_within_one_plugin(registry_guard):
    plugin = _plugin(
        "test_self_duplicate",
        lambda: [
            curvkit.EstimatorSpec("twice", ScaledHessian),
            curvkit.EstimatorSpec("twice", ScaledHessian),
        ],
    )
    with pytest.raises(curvkit.DuplicateEstimatorError, match="twice"):
        curvkit.register_plugin(plugin)
    assert not curvkit.plugin_manager().is_registered(plugin)


def test_unknown_hook_is_refused(registry_guard):
    module = types.ModuleType("test_typo_plugin")

    @curvkit.hookimpl
    def curvkit_typo():
        return []

    module.curvkit_typo = curvkit_typo
    with pytest.raises(curvkit.PluginError) as info:
        curvkit.register_plugin(module)
    assert "curvkit_typo" in str(info.value) and "\n" not in str(info.value)
    assert not curvkit.plugin_manager().is_registered(module)


def test_hook_with_a_wrong_signature_is_a_plugin_error(registry_guard):
    class WrongSignature:
        @curvkit.hookimpl
        def curvkit_register_estimators(self, problem):
            return []

    with pytest.raises(curvkit.PluginError) as info:
        curvkit.register_plugin(WrongSignature())
    assert "problem" in str(info.value) and "\n" not in str(info.value)


def test_registering_twice_is_a_plugin_error(registry_guard):
    plugin = _plugin("test_twice_plugin", lambda: [curvkit.EstimatorSpec("once", ScaledHessian)])
    curvkit.register_plugin(plugin)
    try:
        with pytest.raises(curvkit.PluginError):
            curvkit.register_plugin(plugin)
        assert _names().count("once") == 1
    finally:
        curvkit.unregister_plugin(plugin)


def test_hook_returning_something_else_than_specs(registry_guard):
    plugin = _plugin("test_bad_return", lambda: ["hessian-but-a-string"])
    with pytest.raises(curvkit.PluginError, match="EstimatorSpec"):
        curvkit.register_plugin(plugin)
    assert not curvkit.plugin_manager().is_registered(plugin)


def test_factory_returning_a_non_operator(registry_guard):
    plugin = _plugin(
        "test_non_operator",
        lambda: [curvkit.EstimatorSpec("matrix", lambda problem: torch.eye(problem.dim, dtype=DT))],
    )
    curvkit.register_plugin(plugin, name="test-non-operator")
    try:
        with pytest.raises(curvkit.PluginError) as info:
            curvkit.curvature("matrix", get_case("mlp-mse").problem())
        message = str(info.value)
        assert "'matrix'" in message and "test-non-operator" in message and "Tensor" in message
    finally:
        curvkit.unregister_plugin(plugin)


def test_an_unknown_option_is_refused_listing_the_options_taken():
    problem = get_case("mlp-mse").problem()
    with pytest.raises(curvkit.UnknownOptionError) as info:
        curvkit.curvature("hessian", problem, stratgy="reverse")
    assert str(info.value) == (
        "estimator 'hessian' takes no option 'stratgy'; its options: strategy, cache_graph, graph_cache_bytes"
    )
    with pytest.raises(curvkit.UnknownOptionError, match="'exact-hessian' takes no option 'seed'"):
        curvkit.curvature("exact-hessian", problem, seed=1)


def test_unregister_by_name(registry_guard):
    plugin = _plugin("test_by_name", lambda: [curvkit.EstimatorSpec("by-name", ScaledHessian)])
    curvkit.register_plugin(plugin, name="test-by-name")
    assert "by-name" in _names()
    curvkit.unregister_plugin(name="test-by-name")
    assert "by-name" not in _names()


def test_a_hook_returning_one_spec_instead_of_a_list_names_the_plugin(registry_guard):
    plugin = _plugin("test_single_spec", lambda: curvkit.EstimatorSpec("single", ScaledHessian))
    with pytest.raises(curvkit.PluginError) as info:
        curvkit.register_plugin(plugin, name="test-single")
    assert "plugin 'test-single' returned a EstimatorSpec from curvkit_register_estimators" in str(info.value)
    assert "([spec], not spec)" in str(info.value)
    assert "single" not in _names()  # refused, and the registry is as it was


def test_unregistering_a_plugin_that_is_not_registered_is_an_error(registry_guard):
    with pytest.raises(curvkit.PluginError, match="cannot unregister 'nobody': no such plugin is registered"):
        curvkit.unregister_plugin(name="nobody")
    with pytest.raises(curvkit.PluginError, match="no such plugin is registered .*curvkit.plugins.hessian"):
        curvkit.unregister_plugin(types.ModuleType("never_registered"))
