"""The optimizers' shared base and the per-batch problem path (Problem.on_batch)."""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import pkgutil
import threading
import warnings

import pytest
import torch
from torch import nn

import curvkit
import curvkit.finite as finite_module
from curvkit.autodiff import backward_products
from curvkit.optim.base import (
    CurvatureOptimizer,
    all_finite,
    check_choice,
    check_fraction,
    check_integer,
    check_positive,
    check_seed,
    first_non_finite,
    levenberg_marquardt,
    loss_at,
)

DT = torch.float64


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    return model, torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))


def test_a_batch_problem_has_the_curvature_of_its_batch_without_copies_or_probes():
    model, X, y = model_and_batch()
    template = curvkit.Problem(model, "cross_entropy", (torch.zeros(2, 3, dtype=DT), torch.zeros(2).long()))
    light = template.on_batch(X, y)
    full = curvkit.Problem(model, "cross_entropy", (X, y))
    H_light = curvkit.curvature("hessian", light).to_dense()
    torch.testing.assert_close(H_light, curvkit.curvature("hessian", full).to_dense(), rtol=1e-12, atol=1e-14)
    G = curvkit.curvature("ggn", light).to_dense()
    torch.testing.assert_close(G, curvkit.curvature("ggn", full).to_dense(), rtol=1e-12, atol=1e-14)
    snapshot = light.current_snapshot()
    assert snapshot is light.current_snapshot() and not hasattr(snapshot, "values")  # nothing copied
    assert light.check_deterministic is False and light.track_state is False
    assert full.current_snapshot().values  # the analysis path copies the state


def test_the_optimizer_base_builds_the_batch_problem_of_its_parameters():
    model, X, y = model_and_batch()
    optimizer = CurvatureOptimizer(model[2].parameters(), {"lr": 0.1}, model=model, loss_fn="cross_entropy")
    problem = optimizer.batch_problem(X, y)
    assert problem.param_names == ("2.weight", "2.bias") and problem.num_samples() == 6
    with pytest.raises(ValueError, match="needs model= and loss_fn="):
        CurvatureOptimizer(model.parameters(), {"lr": 0.1}).batch_problem(X, y)
    stranger = CurvatureOptimizer([nn.Parameter(torch.zeros(3))], {"lr": 0.1}, model=model, loss_fn="mse")
    with pytest.raises(ValueError, match=r"1 optimized tensor\(s\) \(shapes \[\(3,\)\]\) are not parameters"):
        stranger.batch_problem(X, y)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        CurvatureOptimizer(model.parameters(), {}, model="net")


def test_non_finite_updates_are_skipped_with_a_warning_and_counted_in_the_state():
    model, _, _ = model_and_batch()
    optimizer = CurvatureOptimizer(model.parameters(), {"lr": 0.1})
    p = next(model.parameters())
    before = p.detach().clone()
    assert optimizer.apply_updates([(p, torch.ones_like(p))])
    assert torch.equal(p, before + 1)
    with pytest.warns(
        curvkit.CurvkitWarning, match="CurvatureOptimizer: step skipped: the step is not finite"
    ):
        assert not optimizer.apply_updates([(p, torch.full_like(p, float("nan")))], what="step")
    assert torch.equal(p, before + 1) and optimizer.skipped_steps == 1
    state = optimizer.state_dict()
    fresh = CurvatureOptimizer(model.parameters(), {"lr": 0.1})
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == 1
    with pytest.raises(ValueError, match="not a CurvatureOptimizer state_dict"):
        fresh.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_the_checks_name_the_hyper_parameter_and_its_range():
    assert check_positive("lr", 1) == 1.0 and check_positive("damping", 0, zero=True) == 0.0
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got 0"):
        check_positive("lr", 0)
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got True"):
        check_positive("lr", True)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\), got 1"):
        check_fraction("beta", 1, below_one=True)
    with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
        check_integer("every", 0)
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        check_choice("mode", "c", ("a", "b"))


def test_the_checks_take_numpy_numbers_and_one_element_tensors_as_plain_numbers():
    """curvkit.arguments' rules: a NumPy number or a one-element tensor (refused before) is a
    number, kept as a float; a NumPy integer an integer, kept as an int; a ValueError still."""
    np = pytest.importorskip("numpy")
    for value in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5])):
        for got in (check_positive("lr", value), check_fraction("momentum", value)):
            assert got == 0.5 and type(got) is float
    assert type(check_integer("every", np.int64(3))) is int and check_integer("every", np.int64(3)) == 3
    assert type(check_seed("seed", np.uint64(7))) is int and check_seed("seed", np.uint64(7)) == 7
    for bad in (math.inf, torch.tensor(math.nan), torch.ones(2)):
        with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got "):
            check_positive("lr", bad)
    model = nn.Linear(2, 1)
    optimizer = curvkit.optim.AdaHessian(
        model.parameters(), lr=np.float64(0.01), betas=(torch.tensor(0.5), 0.25), update_each=np.int64(2)
    )
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], optimizer.period) == (0.01, (0.5, 0.25), 2)
    assert [type(x) for x in (group["lr"], *group["betas"], optimizer.period)] == [float, float, float, int]


BATCH_OPTIMIZERS = ("Newton", "HessianFree", "KFAC", "EKFAC", "NaturalGradient")
GRADIENT_OPTIMIZERS = ("DiagonalNewton", "AdaHessian", "SophiaH", "Shampoo")


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS)
def test_a_skipped_step_warns_once_at_the_callers_line_and_leaves_the_parameters(name):
    model, X, y = model_and_batch()
    X[0, 0] = float("nan")  # a non-finite loss and gradient
    cls = getattr(curvkit.optim, name)
    batch = name in BATCH_OPTIMIZERS
    optimizer = cls(model.parameters(), **({"model": model, "loss_fn": "cross_entropy"} if batch else {}))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward(create_graph=name in GRADIENT_OPTIMIZERS[:3])
    with pytest.warns(
        curvkit.CurvkitWarning, match=rf"^{name}: step skipped: the .* not finite \("
    ) as record:
        optimizer.step(batch=(X, y)) if batch else optimizer.step()  # the line the warning must name
    (warning,) = [w for w in record if issubclass(w.category, curvkit.CurvkitWarning)]
    assert warning.filename == __file__, (warning.filename, warning.lineno)
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_apply_updates_scales_each_delta_as_it_adds_it_and_checks_the_deltas():
    params = [nn.Parameter(torch.zeros(2, dtype=DT)) for _ in range(4)]
    deltas = [torch.full((2,), float(i + 1), dtype=DT) for i in range(4)]
    optimizer = CurvatureOptimizer(params, {"lr": 0.1})
    scales = [2.0, 2.0, -0.5, 2.0]  # runs of equal scales: three fused additions
    assert optimizer.apply_updates(list(zip(params, deltas)), scales=scales)
    for p, d, scale in zip(params, deltas, scales):
        assert torch.equal(p.detach(), scale * d)
    assert optimizer.apply_updates(list(zip(params, deltas)), scales=[-1.0] * 4)  # one addition
    assert all(torch.equal(p.detach(), (scale - 1) * d) for p, d, scale in zip(params, deltas, scales))
    deltas[1] = torch.tensor([1.0, float("inf")], dtype=DT)
    with pytest.warns(curvkit.CurvkitWarning, match="the update is not finite"):
        assert not optimizer.apply_updates(list(zip(params, deltas)), scales=scales)
    with pytest.warns(curvkit.CurvkitWarning, match="the update is not finite"), torch.no_grad():
        assert not optimizer.apply_updates(list(zip(params, deltas)))  # and under no_grad
    assert all(torch.equal(p.detach(), (scale - 1) * torch.full((2,), float(i + 1), dtype=DT))
               for i, (p, scale) in enumerate(zip(params, scales)))  # fmt: skip
    with pytest.raises(ValueError, match="apply_updates: 2 scales for 4 updates"):
        optimizer.apply_updates(list(zip(params, deltas)), scales=[1.0, 2.0])  # nothing applied either
    assert all(torch.equal(p.detach(), (scale - 1) * torch.full((2,), float(i + 1), dtype=DT))
               for i, (p, scale) in enumerate(zip(params, scales)))  # fmt: skip


def test_all_finite_checks_every_floating_entry_in_one_fused_call_and_leaves_the_values():
    nan, inf = float("nan"), float("inf")
    finite = [torch.randn(3, 4), torch.randn(5, dtype=DT), torch.tensor([1e38, -1e38])]  # no overflow
    kept = [t.clone() for t in finite]
    assert all_finite(finite) and all_finite([]) and all_finite([None, torch.tensor([1, 2])])
    assert all(torch.equal(t, k) for t, k in zip(finite, kept))  # multiplied by 1: unchanged
    for bad in (nan, inf, -inf):
        assert not all_finite([*finite, torch.tensor([0.0, bad], dtype=DT)])
        assert not all_finite([torch.tensor([bad], dtype=torch.bfloat16)])
        assert not all_finite([torch.tensor([complex(1.0, bad)])])  # through the real view
    w = nn.Parameter(torch.ones(3))
    (gradient,) = torch.autograd.grad((w**3).sum(), w, create_graph=True)
    assert all_finite([w, gradient])  # tensors in a graph are checked through detached views
    with torch.no_grad():  # and from inside no_grad, which the check does not enter again
        assert all_finite([w, gradient]) and not all_finite([w, gradient, torch.tensor([nan])])
    assert torch.is_grad_enabled()
    (second,) = torch.autograd.grad(gradient.sum(), w)  # the graph still works
    torch.testing.assert_close(second, 6 * torch.ones(3))


def test_all_finite_never_reuses_a_raised_flag_across_calls_threads_or_inference_mode():
    good, bad = [torch.ones(2), torch.zeros(3, dtype=DT)], [torch.ones(2), torch.tensor([float("nan")])]
    with torch.inference_mode():  # the CPU flag made here must serve checks outside it too
        assert all_finite(good) and not all_finite(bad) and all_finite(good)
    assert all_finite(good) and not all_finite(bad) and all_finite(good) and all_finite(good)
    expected = [i % 3 != 0 for i in range(300)]
    answers: dict[int, list[bool]] = {}

    def check(worker: int) -> None:
        answers[worker] = [all_finite(good if finite else bad) for finite in expected]

    flags: dict[int, torch.Tensor] = {}

    def flag(worker: int) -> None:  # each thread's flag is its own: one shared flag races
        flags[worker] = finite_module._flag_and_unit(torch.device("cpu"))[0]  # kept alive: no id reused

    threads = [threading.Thread(target=check, args=(worker,)) for worker in range(4)]
    threads += [threading.Thread(target=flag, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(answers[worker] == expected for worker in range(4))
    assert len({id(f) for f in flags.values()}) == 4


def test_all_finite_works_whatever_the_default_dtype():
    assert not all_finite([torch.tensor([float("nan")])])  # drops this thread's flag: made anew below
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the fused check needs float32 flags and scales
    try:
        assert all_finite([torch.ones(2)]) and not all_finite([torch.tensor([float("inf")])])
    finally:
        torch.set_default_dtype(previous)


def test_first_non_finite_names_the_first_pair_with_a_non_finite_entry():
    good, bad = [torch.ones(2)], [torch.tensor([1.0, float("nan")])]
    assert first_non_finite([("gradient", good), ("state", good)]) is None
    assert first_non_finite([("gradient", good), ("state", bad), ("update", bad)]) == "state"


def test_first_non_finite_leaves_implied_pairs_to_the_pairs_that_carry_them():
    good, bad = [torch.ones(2)], [torch.tensor([1.0, float("inf")])]
    # the contract: an implied pair is not checked on its own while the rest is finite ...
    assert first_non_finite([("gradient", bad), ("state", good)], implied={"gradient"}) is None
    # ... and is named, in its place, when the pair that carries it is not finite
    assert first_non_finite([("gradient", bad), ("state", bad)], implied={"gradient"}) == "gradient"
    assert first_non_finite([("gradient", good), ("state", bad)], implied={"gradient"}) == "state"


@pytest.mark.parametrize("K", [1, 3])
def test_backward_products_equal_a_product_per_direction_and_zeros_where_unused(K):
    torch.manual_seed(0)
    a, b, unused = (nn.Parameter(torch.randn(n, dtype=DT)) for n in (3, 2, 4))
    loss = (a.sum() ** 2) * b.prod() + (a**3).sum()
    grads = torch.autograd.grad(loss, [a, b], create_graph=True)
    V = [torch.randn(K, 3, dtype=DT), torch.randn(K, 2, dtype=DT), torch.randn(K, 4, dtype=DT)]
    H = torch.autograd.functional.hessian(
        lambda x, y: (x.sum() ** 2) * y.prod() + (x**3).sum(), (a.detach(), b.detach())
    )
    dense = torch.cat([torch.cat([H[0][0], H[0][1]], 1), torch.cat([H[1][0], H[1][1]], 1)])
    expected = torch.cat([V[0], V[1]], 1) @ dense.T
    for batched in (False, True):
        out = backward_products([*grads, None], [a, b, unused], V, batched=batched)
        assert [tuple(o.shape) for o in out] == [(K, 3), (K, 2), (K, 4)]
        torch.testing.assert_close(torch.cat(out[:2], 1), expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(out[2], torch.zeros(K, 4, dtype=DT))


def test_a_group_is_checked_from_the_table_kept_normalised_and_not_added_when_invalid():
    model, _, _ = model_and_batch()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    optimizer = curvkit.optim.AdaHessian([{"params": first, "betas": [0.5, 0.25]}])
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.25)  # the check's value is kept
    with pytest.raises(
        ValueError, match=r"^parameter group 1: betas\[1\] must be a number in \[0, 1\), got 1"
    ):
        optimizer.add_param_group({"params": second, "betas": (0.9, 1)})
    with pytest.raises(ValueError, match=r"^parameter group 1 is empty$"):
        optimizer.add_param_group({"params": []})
    assert len(optimizer.param_groups) == 1  # neither was added
    optimizer.add_param_group({"params": second})
    assert len(optimizer.param_groups) == 2
    with pytest.raises(ValueError, match="real floating-point tensors, got one of dtype torch.int64"):
        curvkit.optim.Shampoo([torch.zeros(2, dtype=torch.long)])


def test_the_optimizer_modules_share_the_bases_checks():
    import curvkit.optim.base as base

    for info in pkgutil.iter_modules(curvkit.optim.__path__):
        module_name = info.name
        module = importlib.import_module(f"curvkit.optim.{module_name}")
        for name in dir(base):
            if name.startswith("check_") and hasattr(module, name):
                assert getattr(module, name) is getattr(base, name), f"curvkit.optim.{module_name}.{name}"


def make_optimizer(name: str, params, model: nn.Module, **settings):
    """Optimizer ``name`` of ``params`` (of ``model``), given the model and loss where it takes them."""
    batch = {"model": model, "loss_fn": "cross_entropy"} if name in BATCH_OPTIMIZERS else {}
    return getattr(curvkit.optim, name)(params, **batch, **settings)


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS)
def test_a_group_setting_a_hyper_parameter_of_the_whole_optimizer_is_refused(name):
    model, _, _ = model_and_batch()
    optimizer = make_optimizer(name, model[0].parameters(), model)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    signature = inspect.signature(type(optimizer).__init__).parameters.values()
    settings = {p.name for p in signature if p.kind in named} - {"self", "params", "model", "loss_fn"}
    assert settings - set(optimizer.defaults) <= set(optimizer.GLOBAL)  # none is accepted and ignored
    for setting in optimizer.GLOBAL:
        with pytest.raises(
            ValueError,
            match=rf"^parameter group 1: {name} takes only .* per parameter group: {setting} applies to the "
            "whole optimizer; pass it to the constructor$",
        ):
            optimizer.add_param_group({"params": model[2].parameters(), setting: None})
        assert len(optimizer.param_groups) == 1
    if name in ("KFAC", "EKFAC"):  # the estimator's options too
        assert {"fisher_type", "mc_samples", "seed"} <= set(optimizer.GLOBAL)
    for setting in optimizer.GLOBAL[:1]:  # at construction too
        with pytest.raises(
            ValueError, match=f"^parameter group 0: .* {setting} applies to the whole optimizer"
        ):
            make_optimizer(name, [{"params": model.parameters(), setting: None}], model)


def stepped(name: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor, **settings):
    """Optimizer ``name`` of ``model``'s parameters after one step on ``(X, y)``."""
    optimizer = make_optimizer(name, model.parameters(), model, **settings)
    optimizer.zero_grad()
    if name in BATCH_OPTIMIZERS:
        optimizer.step(batch=(X, y))
    else:
        nn.functional.cross_entropy(model(X), y).backward(create_graph=name != "Shampoo")
        optimizer.step()
    return optimizer


def same(a, b) -> bool:
    """Whether two state dicts are equal: tensors bit for bit, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b or (a != a and b != b)


@pytest.mark.parametrize(
    "loader, writer, without_kind",
    [
        ("AdaHessian", "Shampoo", "lacks eps, hessian_power, spatial_averaging"),
        ("Shampoo", "AdaHessian", "lacks epsilon, update_freq"),
        ("SophiaH", "AdaHessian", "lacks rho"),
        ("KFAC", "EKFAC", None),  # the same groups and extra state: loaded without a kind
        ("Newton", "HessianFree", None),
    ],
)
def test_a_state_dict_of_another_kind_is_refused_before_anything_is_loaded(loader, writer, without_kind):
    model, X, y = model_and_batch()
    optimizer = stepped(loader, model, X, y)
    before = copy.deepcopy(optimizer.state_dict())
    assert before["curvkit"]["kind"] == loader
    other = stepped(writer, model, X, y).state_dict()
    with pytest.raises(
        ValueError, match=rf"^this state_dict was written by {writer}, not by {loader}: not loaded$"
    ):
        optimizer.load_state_dict(other)
    assert same(optimizer.state_dict(), before)
    del other["curvkit"]["kind"]  # as written before kinds were kept: the groups are checked
    if without_kind is not None:
        with pytest.raises(
            ValueError, match=rf"^{loader}.load_state_dict: the state dict's parameter group 0 {without_kind}"
        ):
            optimizer.load_state_dict(other)
        assert same(optimizer.state_dict(), before)
    own = copy.deepcopy(before)
    del own["curvkit"]["kind"]  # its own kind's, written before kinds were kept: loaded
    optimizer.load_state_dict(own)
    assert same(optimizer.state_dict(), before)


def test_a_subclass_made_elsewhere_has_its_curvkit_optimizers_kind():
    """``class MyKFAC(KFAC)`` and KFAC load each other's state; EKFAC (curvkit's own) stays apart."""
    model, X, y = model_and_batch()
    subclass = type("MyKFAC", (curvkit.optim.KFAC,), {"__module__": "my_training"})
    assert subclass.state_kind() == "KFAC" and curvkit.optim.EKFAC.state_kind() == "EKFAC"
    kfac = stepped("KFAC", model, X, y)
    mine = subclass(model.parameters(), model=model, loss_fn="cross_entropy")
    mine.load_state_dict(kfac.state_dict())
    assert same(mine.state_dict(), kfac.state_dict())
    kfac.load_state_dict(mine.state_dict())
    own = type("Mine", (curvkit.optim.base.CurvatureOptimizer,), {"__module__": "my_training"})
    assert own.state_kind() == "Mine"


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS)
def test_a_state_dict_with_an_invalid_group_is_refused_before_anything_is_loaded(name):
    model, X, y = model_and_batch()
    optimizer = stepped(name, model, X, y)
    before = copy.deepcopy(optimizer.state_dict())
    fresh = make_optimizer(name, model.parameters(), model)
    fresh_state = copy.deepcopy(fresh.state_dict())
    invalid = copy.deepcopy(before)
    invalid["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"parameter group 0: lr must be a finite number >=? 0, got -1.0"):
        fresh.load_state_dict(invalid)
    assert same(fresh.state_dict(), fresh_state)
    if optimizer.GLOBAL:
        setting = copy.deepcopy(before)
        setting["param_groups"][0][optimizer.GLOBAL[0]] = None
        with pytest.raises(ValueError, match=f"parameter group 0: {name} takes only .* whole optimizer"):
            fresh.load_state_dict(setting)
        assert same(fresh.state_dict(), fresh_state)
    fresh.load_state_dict(before)
    assert same(fresh.state_dict(), before)


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS)
def test_a_state_dict_loads_again_into_the_same_optimizer(name):
    """torch's load_state_dict adds ``differentiable`` to the optimizer's defaults, which no saved group
    has: a second load (a checkpoint restored twice) was refused ("parameter group 0 lacks
    differentiable")."""
    model, X, y = model_and_batch()
    optimizer = stepped(name, model, X, y)
    saved = copy.deepcopy(optimizer.state_dict())
    for _ in range(2):
        optimizer.load_state_dict(copy.deepcopy(saved))
        assert same(optimizer.state_dict(), saved)


def test_natural_gradient_refuses_the_state_of_the_other_curvature_before_loading_it():
    model, X, y = model_and_batch()
    ggn = stepped("NaturalGradient", model, X, y, momentum=0.9, lr=0.5)
    fisher = make_optimizer("NaturalGradient", model.parameters(), model, curvature="fisher", lr=0.1)
    before = copy.deepcopy(fisher.state_dict())
    with pytest.raises(ValueError, match="curvature='ggn', not 'fisher'"):
        fisher.load_state_dict(ggn.state_dict())
    assert same(fisher.state_dict(), before) and not fisher.state


def test_the_levenberg_marquardt_rule_keeps_each_optimizers_arithmetic_and_bounds():
    """The rule as KFAC, HessianFree and NaturalGradient wrote it before it was shared, to the last bit."""

    def kfac(damping, rho, omega):  # Martens and Grosse's omega < 1, kept in [1e-8, 1e8]
        if rho > 0.75:
            damping *= omega
        elif rho < 0.25:
            damping /= omega
        return min(max(damping, 1e-8), 1e8)

    def hessian_free(damping, rho):  # Martens 2010: 3/2 and 2/3
        return damping * 1.5 if rho < 0.25 else damping * (2.0 / 3.0) if rho > 0.75 else damping

    def natural_gradient(damping, rho, smallest):  # 3/2 up, divided by 3/2 down to the smallest
        return damping * 1.5 if rho < 0.25 else max(damping / 1.5, smallest) if rho > 0.75 else damping

    rule = {"lower": 0.25, "upper": 0.75}
    generator = torch.Generator().manual_seed(0)
    dampings = (10.0 ** (torch.rand(400, generator=generator, dtype=DT) * 16 - 8)).tolist() + [1e-8, 1e8]
    ratios = [-math.inf, -1.0, 0.0, 0.25, 0.5, 0.75, 0.9, 2.0, math.nan]
    for damping in dampings:
        for rho in ratios:
            for every in (1, 5):
                omega = (19 / 20) ** every
                got = levenberg_marquardt(damping, rho, **rule, factor=omega, bounds=(1e-8, 1e8))
                assert got == kfac(damping, rho, omega)
            assert levenberg_marquardt(damping, rho, **rule, factor=(1.5, 2.0 / 3.0)) == hessian_free(
                damping, rho
            )
            for smallest in (1e-8, 1e-3, damping):
                got = levenberg_marquardt(damping, rho, **rule, factor=1.5, bounds=(smallest, None))
                assert got == natural_gradient(damping, rho, smallest)


def test_the_batch_loss_at_a_step_leaves_the_model_as_it_was():
    model, X, y = model_and_batch()
    optimizer = CurvatureOptimizer(model.parameters(), {"lr": 0.1}, model=model, loss_fn="cross_entropy")
    problem = optimizer.batch_problem(X, y)
    delta = torch.randn(problem.dim, dtype=DT)
    before = [p.detach().clone() for p in model.parameters()]
    torch.testing.assert_close(loss_at(problem), nn.functional.cross_entropy(model(X), y))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(moved.parameters(), problem.layout.unflatten(delta)):
            p.add_(d)
    torch.testing.assert_close(loss_at(problem, delta), nn.functional.cross_entropy(moved(X), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert loss_at(problem, delta).grad_fn is None


def train(name: str, optimizer, model: nn.Module, batches, scheduler=None) -> None:
    """Steps ``optimizer`` on ``batches`` as a training script does, ``scheduler.step()`` after each."""
    for X, y in batches:
        optimizer.zero_grad()
        if name in BATCH_OPTIMIZERS:
            optimizer.step(batch=(X, y))
        else:
            nn.functional.cross_entropy(model(X), y).backward(create_graph=name != "Shampoo")
            optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS)
def test_a_learning_rate_of_zero_that_a_scheduler_reaches_steps_nowhere_and_resumes(name):
    """``CosineAnnealingLR`` ends at ``eta_min=0`` (``LambdaLR`` warm-ups start there): as in
    torch.optim, ``lr=0`` is taken, moves nothing, and a checkpoint saved then loads and resumes
    bit-identically (it was refused as ``lr must be a finite number > 0``)."""
    model, X, y = model_and_batch()
    batches = [(X[i : i + 3], y[i : i + 3]) for i in (0, 3, 0, 3, 0)]
    settings = {"mode": "damped", "damping": 1.0} if name == "Newton" else {}
    optimizer = make_optimizer(name, model.parameters(), model, lr=0.01, **settings)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
    train(name, optimizer, model, batches[:2], scheduler)
    assert optimizer.param_groups[0]["lr"] == 0.0
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    before = [p.detach().clone() for p in model.parameters()]
    train(name, optimizer, model, batches[2:3])  # a step at lr = 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and optimizer.skipped_steps == 0
    make_optimizer(name, model.parameters(), model, lr=0.0)  # as torch.optim.SGD(lr=0)
    resumed_model = copy.deepcopy(model)
    resumed_model.load_state_dict(saved["model"])
    resumed = make_optimizer(name, resumed_model.parameters(), resumed_model, lr=0.01, **settings)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.param_groups[0]["lr"] == 0.0
    train(name, resumed, resumed_model, batches[2:3])
    for group in (*optimizer.param_groups, *resumed.param_groups):
        group["lr"] = 0.01
    train(name, optimizer, model, batches[3:])
    train(name, resumed, resumed_model, batches[3:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS + ("KFAC without backward",))
def test_a_frozen_parameter_is_not_moved_until_it_is_unfrozen(name):
    """``model.parameters()`` with a layer frozen (``requires_grad=False``), as fine-tuning scripts
    pass it: torch.optim leaves it (its ``.grad`` stays ``None``), and so do the optimizers that take
    the batch's gradient themselves (Newton, HessianFree, NaturalGradient, KFAC without a backward
    pass moved it); unfrozen, it trains."""
    name, backward = name.split()[0], "without backward" not in name
    model, X, y = model_and_batch()
    model[0].weight.requires_grad_(False)
    settings = {"mode": "damped", "damping": 1.0} if name == "Newton" else {}
    optimizer = make_optimizer(name, model.parameters(), model, **settings)
    frozen, trained = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        if name in BATCH_OPTIMIZERS:
            if backward:
                nn.functional.cross_entropy(model(X), y).backward()
            optimizer.step(batch=(X, y))
        else:
            nn.functional.cross_entropy(model(X), y).backward(create_graph=name != "Shampoo")
            optimizer.step()
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[2].weight, trained)
    assert optimizer.skipped_steps == 0
    model[0].weight.requires_grad_(True)
    train(name, optimizer, model, [(X, y)] if backward else [])
    if not backward:
        optimizer.step(batch=(X, y))
    assert not torch.equal(model[0].weight, frozen) and optimizer.skipped_steps == 0
    for p in model.parameters():
        p.requires_grad_(False)
    if name in BATCH_OPTIMIZERS:
        with pytest.raises(ValueError, match=rf"^{name}: none of the optimized parameters requires grad"):
            optimizer.step(batch=(X, y))


def floating_state(optimizer) -> list[torch.Tensor]:
    """Every floating tensor of ``optimizer``'s state dict, KFAC's factors included."""
    found: list[torch.Tensor] = []

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            found.extend([value] if value.is_floating_point() else [])
        elif isinstance(value, dict):
            [walk(v) for k, v in value.items() if k != "rng_state"]
        elif isinstance(value, list | tuple):
            [walk(v) for v in value]

    state = optimizer.state_dict()
    walk(state["state"]), walk(state["curvkit"])
    return found


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS)
def test_a_state_saved_in_float32_resumes_on_the_model_moved_to_float64(name):
    """``model.double()`` then ``load_state_dict``: torch.optim casts the state to the parameters'
    dtype; KFAC's factors and Shampoo's buffers kept float32 and the next step raised a dtype
    mismatch (``dot : expected both vectors to have same dtype``)."""
    model, X, y = model_and_batch()
    model, X = model.float(), X.float()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    settings = {"mode": "damped", "damping": 1.0} if name == "Newton" else {}
    optimizer = make_optimizer(name, model.parameters(), model, lr=0.01, **settings)
    train(name, optimizer, model, batches)
    saved = optimizer.state_dict()
    model.double()
    resumed = make_optimizer(name, model.parameters(), model, lr=0.01, **settings)
    resumed.load_state_dict(saved)
    assert not any(t.dtype == torch.float32 for t in floating_state(resumed))
    train(name, resumed, model, [(x.double(), t) for x, t in batches])
    assert resumed.skipped_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(t.dtype == torch.float32 for t in floating_state(resumed))


@pytest.mark.parametrize("name", BATCH_OPTIMIZERS + GRADIENT_OPTIMIZERS)
def test_a_state_dict_of_other_parameters_is_refused_naming_the_shapes(name):
    """torch.optim matches a state dict's parameters to the optimizer's by position; built over the
    parameters in another order, KFAC, AdaHessian, SophiaH, Shampoo and HessianFree failed inside
    the next step (``The size of tensor a (6) must match ...``), DiagonalNewton and NaturalGradient
    went on with another tensor's state. The shapes saved with the state are compared first."""
    model, X, y = model_and_batch()
    optimizer = stepped(name, model, X, y)
    saved = copy.deepcopy(optimizer.state_dict())
    other = make_optimizer(name, list(model.parameters())[::-1], model)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(
        ValueError,
        match=rf"^{name}.load_state_dict: parameter 0 of group 0 has shape \(2,\) here but \(4, 3\) in the "
        r"state dict: build the optimizer over the parameters it was saved for, in the same order$",
    ):
        other.load_state_dict(saved)
    assert same(other.state_dict(), before)
    del saved["curvkit"]["shapes"]  # as written before the shapes were kept: loaded as before
    make_optimizer(name, model.parameters(), model).load_state_dict(saved)


@pytest.mark.parametrize("name", [*BATCH_OPTIMIZERS, "CurvaturePreconditioner"])
@pytest.mark.parametrize(
    "loss_fn, message",
    [
        ("crossentropy", r"^unknown loss 'crossentropy'; use one of \['bce_with_logits', 'cross_entropy'"),
        (nn.CrossEntropyLoss(reduction="none"), r"^loss module CrossEntropyLoss has reduction='none'"),
        (42, r"^loss must be a name in .* or a callable, got int$"),
    ],
)
def test_a_loss_that_cannot_be_used_is_refused_at_construction(name, loss_fn, message):
    """As the other invalid arguments: the optimizer was built and the loss refused at the first
    step (with the same one-line ValueError), after the training script had started."""
    model, _, _ = model_and_batch()
    with pytest.raises(ValueError, match=message):
        if name == "CurvaturePreconditioner":
            curvkit.optim.CurvaturePreconditioner(model, "kfac", loss_fn=loss_fn)
        else:
            getattr(curvkit.optim, name)(model.parameters(), model=model, loss_fn=loss_fn)


@pytest.mark.parametrize("name", [*BATCH_OPTIMIZERS, "CurvaturePreconditioner"])
def test_a_step_inside_autocast_works_in_the_parameters_dtype(name):
    """Scripts that wrap the whole iteration in ``torch.autocast("cpu", dtype=torch.bfloat16)``:
    KFAC's factors came out in bfloat16, every step was skipped as "singular to working precision:
    add damping"; the curvature and the step are now those of the parameters' dtype, as without
    autocast (the user's own forward and backward keep their autocast)."""
    model, X, y = model_and_batch()
    model, X = model.float(), X.float()
    reference = copy.deepcopy(model)

    def run(net, autocast):
        if name == "CurvaturePreconditioner":
            optimizer = curvkit.optim.CurvaturePreconditioner(net, "kfac", loss_fn="cross_entropy")
        else:
            settings = {"mode": "damped", "damping": 1.0} if name == "Newton" else {}
            optimizer = make_optimizer(name, net.parameters(), net, **settings)
        for _ in range(2):
            net.zero_grad()
            if name in ("KFAC", "EKFAC", "CurvaturePreconditioner"):
                nn.functional.cross_entropy(net(X), y).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                optimizer.step(batch=(X, y))
        return optimizer

    optimizer = run(model, True)
    run(reference, False)
    assert optimizer.skipped_steps == 0
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [*BATCH_OPTIMIZERS, "CurvaturePreconditioner"])
def test_a_compiled_model_steps_as_its_original_module(name):
    """``model=torch.compile(net)``: the step's problem is the original module's (Newton and HessianFree
    raised torch's "compiled with non-empty donated buffers" at the Hessian's products, and the names
    were ``_orig_mod.*``); the steps equal those of the uncompiled model. Nothing is compiled: KFAC's
    and the preconditioner's ``.grad`` come from the original module."""
    model, X, y = model_and_batch()
    reference = copy.deepcopy(model)

    def run(net, given):
        if name == "CurvaturePreconditioner":
            optimizer = curvkit.optim.CurvaturePreconditioner(given, "kfac", loss_fn="cross_entropy")
        else:
            settings = {"mode": "damped", "damping": 1.0} if name == "Newton" else {}
            optimizer = make_optimizer(name, given.parameters(), given, **settings)
        for _ in range(2):
            net.zero_grad()
            if name in ("KFAC", "CurvaturePreconditioner"):
                nn.functional.cross_entropy(net(X), y).backward()
            optimizer.step(batch=(X, y))  # EKFAC: the batch's gradient
        return optimizer

    optimizer = run(model, torch.compile(model))
    run(reference, reference)
    assert optimizer.skipped_steps == 0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["KFAC", "EKFAC", "CurvaturePreconditioner"])
def test_a_misspelt_argument_is_refused_listing_the_arguments_and_the_estimators_options(name):
    """Constructors that pass their other keywords to the estimator (``**estimator_options``) said only
    "estimator 'kfac' takes no option 'weight_decy'; its options: fisher_type, ...", as if the
    optimizer had no hyper-parameters: the message lists both, with the closest name."""
    model, _, _ = model_and_batch()
    if name == "CurvaturePreconditioner":
        build, error = (lambda **kw: curvkit.optim.CurvaturePreconditioner(model, "kfac", **kw)), TypeError
        first, typo, meant = "model, estimator, loss_fn, damping", "dampin", "damping"
    else:
        build, error = (
            (lambda **kw: getattr(curvkit.optim, name)(model.parameters(), model=model, **kw)),
            ValueError,
        )
        first, typo, meant = "params, model, loss_fn, lr, damping", "weight_decy", "weight_decay"
    with pytest.raises(error) as exc:
        build(loss_fn="cross_entropy", **{typo: 1e-4})
    (line,) = str(exc.value).splitlines()
    assert line.startswith(
        f"{name} takes no argument {typo!r} (did you mean {meant!r}?): its arguments are {first}, "
    )
    estimator = "ekfac" if name == "EKFAC" else "kfac"
    assert line.endswith(
        f"; the options of estimator {estimator!r} are fisher_type, mc_samples, seed, approx, fold_bias, "
        "unsupported, max_factor_bytes"
    )


@pytest.mark.parametrize("name", [*BATCH_OPTIMIZERS, "KFAC with backward"])
def test_a_model_in_training_mode_stepped_in_evaluation_mode_is_warned_about_once(name):
    """With ``eval_mode=True`` (the default) the step's loss, gradient and curvature are the model's
    in evaluation mode: BatchNorm with running statistics that no step updates, no dropout. A model
    left in training mode was trained so silently. Optimizers that compute the gradient themselves
    warn once, at the caller's line; ``model.eval()`` silences it, and KFAC given ``.grad`` (the
    user's train-mode gradient, documented eval-mode curvature) does not warn."""
    name, backward = name.split()[0], name.endswith("with backward")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 2))
    model = model.to(DT)
    X, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    settings = {"mode": "damped", "damping": 1.0} if name == "Newton" else {}

    def steps(count: int) -> list[warnings.WarningMessage]:
        optimizer = make_optimizer(name, model.parameters(), model, **settings)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(count):
                optimizer.zero_grad()
                if backward:
                    nn.functional.cross_entropy(model(X), y).backward()
                optimizer.step(batch=(X, y))  # the line the warning must name
        return [w for w in record if issubclass(w.category, curvkit.CurvkitWarning)]

    found = steps(2)
    if backward:
        assert found == []
        return
    (warning,) = found
    assert str(warning.message).startswith(
        f"{name}: the model is in training mode, but with eval_mode=True the step's loss, gradient and "
        "curvature are those of the model in evaluation mode, where its BatchNorm1d '1', Dropout '3' behave "
        "differently: "
    )
    assert warning.filename == __file__, (warning.filename, warning.lineno)
    model.eval()
    assert steps(1) == []
