"""The Problem: loss semantics, data forms, parameter selection, evaluation mode, determinism.

Ground truth is computed here on the whole dataset in one batch, with PyTorch's own
loss (``reduction="mean"`` or ``"sum"``) and plain double backward, independently of
curvkit's batching and loss splitting.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

import curvkit
from curvkit.testing import dense_hessian_reference

DT = torch.float64
N = 50


def _mlp(seed: int = 0, d_in: int = 4, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out)).to(DT)


def _data(seed: int = 1, n: int = N, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=DT), torch.randint(0, classes, (n,), generator=gen)


def _truth(model, loss_fn, inputs, targets, v, names=None):
    """Loss, flat gradient and Hessian-vector product of ``loss_fn(model(inputs), targets)``."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    leaves = {n: named[n].detach().clone().requires_grad_(True) for n in names}
    if isinstance(inputs, dict):
        out = functional_call(model, leaves, args=(), kwargs=inputs)
    else:
        out = functional_call(model, leaves, (inputs,))
    loss = loss_fn(out, targets)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    hv = torch.autograd.grad(flat @ v, list(leaves.values()))
    return loss.detach(), flat.detach(), torch.cat([h.reshape(-1) for h in hv])


def _curvkit(problem, v):
    loss, grad = problem.loss_and_gradient()
    hv = curvkit.curvature("hessian", problem) @ v
    return loss, grad, hv


def _assert_same(got, want, rtol=1e-10):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * max(1.0, w.abs().max().item()))


def _vec(dim: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --------------------------------------------------------------------------- loss semantics
@pytest.mark.parametrize(
    ("loss", "torch_loss"),
    [
        ("cross_entropy", F.cross_entropy),
        ("mse", lambda o, t: F.mse_loss(o, F.one_hot(t, 3).to(DT))),
    ],
    ids=["cross_entropy", "mse"],
)
def test_full_dataset_mean_is_independent_of_batch_size(loss, torch_loss):
    model, (X, y) = _mlp(), _data()
    targets = y if loss == "cross_entropy" else F.one_hot(y, 3).to(DT)
    v = _vec(43)
    want = _truth(model, lambda o, t: torch_loss(o, y), X, y, v)
    small = _curvkit(curvkit.Problem(model, loss, (X, targets), batch_size=7), v)
    large = _curvkit(curvkit.Problem(model, loss, (X, targets), batch_size=64), v)
    _assert_same(small, want)
    _assert_same(large, want)
    _assert_same(small, large)


def test_reduction_sum():
    model, (X, y) = _mlp(), _data()
    v = _vec(43)
    want = _truth(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), X, y, v)
    problem = curvkit.Problem(model, "cross_entropy", (X, y), batch_size=7, reduction="sum")
    assert problem.loss.reduction == "sum"
    _assert_same(_curvkit(problem, v), want)
    # a module with reduction="sum" makes the problem a sum too
    module_problem = curvkit.Problem(model, nn.CrossEntropyLoss(reduction="sum"), (X, y), batch_size=9)
    assert module_problem.loss.reduction == "sum"
    _assert_same(_curvkit(module_problem, v), want)
    # and the mean is the sum over the number of samples
    mean_loss = curvkit.Problem(model, "cross_entropy", (X, y), batch_size=7).loss_and_gradient()[0]
    torch.testing.assert_close(mean_loss * N, want[0], rtol=1e-12, atol=0)


def _ignored_targets():
    X, y = _data(seed=3)
    y = y.clone()
    y[::3] = -1  # ignored, unevenly spread over batches of 7
    return X, y


def _loss_module_cases():
    X, y = _data(seed=3)
    Xi, yi = _ignored_targets()
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(N, 3, generator=gen, dtype=DT), dim=1)
    bits = torch.randint(0, 2, (N, 3), generator=gen).to(DT)
    real = torch.randn(N, 3, generator=gen, dtype=DT)
    logsoft = lambda m: nn.Sequential(m, nn.LogSoftmax(dim=-1))
    pos_weight = torch.tensor([0.5, 2.0, 1.5], dtype=DT)
    return {
        "ce": (nn.CrossEntropyLoss(), None, X, y),
        "ce-ignore-smoothing": (nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1), None, Xi, yi),
        "ce-probabilities": (nn.CrossEntropyLoss(), None, X, probs),
        "mse": (nn.MSELoss(), None, X, real),
        "bce-with-logits": (nn.BCEWithLogitsLoss(), None, X, bits),
        "bce-pos-weight": (nn.BCEWithLogitsLoss(pos_weight=pos_weight), None, X, bits),
        "nll-ignore": (nn.NLLLoss(ignore_index=-1), logsoft, Xi, yi),
        "huber-generic-module": (nn.HuberLoss(delta=0.5), None, X, real),
        "callable-mean": (lambda o, t: ((o - t) ** 2).sum(dim=1).mean(), None, X, real),
    }


@pytest.mark.parametrize("name", list(_loss_module_cases()))
def test_loss_modules_and_callables_match_pytorch_on_the_whole_dataset(name):
    loss, wrap, X, y = _loss_module_cases()[name]
    model = _mlp(seed=4)
    if wrap is not None:
        model = wrap(model)
    v = _vec(43, seed=6)
    want = _truth(model, loss, X, y, v)
    for batch_size in (7, 64):
        problem = curvkit.Problem(model, loss, (X, y), batch_size=batch_size)
        _assert_same(_curvkit(problem, v), want)


@pytest.mark.parametrize(
    ("name", "torch_loss", "targets"),
    [
        ("cross_entropy", F.cross_entropy, "classes"),
        ("nll", lambda o, t: F.nll_loss(torch.log_softmax(o, -1), t), "classes"),
        ("mse", F.mse_loss, "real"),
        ("bce_with_logits", F.binary_cross_entropy_with_logits, "bits"),
    ],
)
def test_loss_names(name, torch_loss, targets):
    X, y = _data(seed=7)
    gen = torch.Generator().manual_seed(8)
    y = {
        "classes": y,
        "real": torch.randn(N, 3, generator=gen, dtype=DT),
        "bits": torch.randint(0, 2, (N, 3), generator=gen).to(DT),
    }[targets]
    model = _mlp(seed=9)
    if name == "nll":
        problem_model = nn.Sequential(model, nn.LogSoftmax(dim=-1))
        want = _truth(model, torch_loss, X, y, _vec(43))
    else:
        problem_model = model
        want = _truth(model, torch_loss, X, y, _vec(43))
    got = _curvkit(curvkit.Problem(problem_model, name, (X, y), batch_size=7), _vec(43))
    _assert_same(got, want)
    assert curvkit.Problem(problem_model, name, (X, y)).loss.name == name


def test_unknown_loss_lists_the_names():
    model, data = _mlp(), _data()
    with pytest.raises(curvkit.UnknownLossError) as info:
        curvkit.Problem(model, "crossentropy", data)
    message = str(info.value)
    assert "crossentropy" in message
    for name in ("cross_entropy", "mse", "bce_with_logits", "nll"):
        assert name in message
    assert "\n" not in message
    assert isinstance(info.value, curvkit.CurvkitError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss": 3},
        {"loss": "mse", "reduction": "median"},
        {"loss": nn.MSELoss(reduction="none")},
        {"loss": nn.HuberLoss(reduction="sum")},
    ],
    ids=["not-a-loss", "bad-reduction", "module-reduction-none", "generic-module-reduction-sum"],
)
def test_invalid_losses_are_refused(kwargs):
    with pytest.raises(curvkit.UnknownLossError):
        curvkit.Problem(_mlp(), data=_data(), **kwargs)


# --------------------------------------------------------------------------- data forms
class _Pairs(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def _data_forms(X, y):
    return {
        "tensor-pair": (X, y),
        "tensor-pair-list": [X, y],
        "tensor-dataset": TensorDataset(X, y),
        "map-dataset": _Pairs(X, y),
        "dataloader": DataLoader(TensorDataset(X, y), batch_size=6),
        "dataloader-shuffled": DataLoader(
            TensorDataset(X, y), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0)
        ),
        "list-of-batches": [(X[i : i + 8], y[i : i + 8]) for i in range(0, N, 8)],
        "tuple-of-batches": tuple((X[i : i + 11], y[i : i + 11]) for i in range(0, N, 11)),
    }


@pytest.mark.parametrize("form", list(_data_forms(*_data())))
def test_data_forms_give_the_full_dataset_curvature(form):
    model, (X, y) = _mlp(), _data()
    v = _vec(43)
    want = _truth(model, F.cross_entropy, X, y, v)
    problem = curvkit.Problem(model, "cross_entropy", _data_forms(X, y)[form], batch_size=7)
    assert problem.num_samples() == N
    _assert_same(_curvkit(problem, v), want)
    # a second pass over the same data gives the same result (re-iterable)
    _assert_same(_curvkit(problem, v), want)


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x, mask):
        return self.net(x * mask)


def test_dict_inputs_call_the_model_with_keywords():
    torch.manual_seed(0)
    model = _DictModel().to(DT)
    X, y = _data()
    mask = (torch.rand(N, 4, generator=torch.Generator().manual_seed(1)) > 0.3).to(DT)
    inputs = {"x": X, "mask": mask}
    v = _vec(43)
    want = _truth(model, F.cross_entropy, inputs, y, v)
    pair = curvkit.Problem(model, "cross_entropy", (inputs, y), batch_size=7)
    _assert_same(_curvkit(pair, v), want)
    batches = [({"x": X[i : i + 9], "mask": mask[i : i + 9]}, y[i : i + 9]) for i in range(0, N, 9)]
    listed = curvkit.Problem(model, "cross_entropy", batches)
    _assert_same(_curvkit(listed, v), want)


def test_model_outputs_with_logits_entry_are_used():
    class WithLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _mlp()

        def forward(self, x):
            return {"logits": self.inner(x), "hidden": x}

    model, (X, y) = WithLogits(), _data()
    v = _vec(43)
    want = _truth(model.inner, F.cross_entropy, X, y, v)
    _assert_same(_curvkit(curvkit.Problem(model, "cross_entropy", (X, y), batch_size=7), v), want)


def test_generator_is_refused():
    X, y = _data()
    batches = ((X[i : i + 10], y[i : i + 10]) for i in range(0, N, 10))
    with pytest.raises(curvkit.DataError, match="one-shot"):
        curvkit.Problem(_mlp(), "cross_entropy", batches)


def test_batch_size_and_max_samples_are_integers():
    """A float batch size or sample count was accepted and failed at the first pass over the data
    (a TypeError from ``range``); a NumPy integer still works."""
    np = pytest.importorskip("numpy")
    X, y = _data()
    for name in ("batch_size", "max_samples"):
        for bad in (2.5, 10.0, True):
            with pytest.raises(curvkit.DataError, match=rf"^{name} must be an integer >= 1, got "):
                curvkit.Problem(_mlp(), "cross_entropy", (X, y), **{name: bad})
    problem = curvkit.Problem(
        _mlp(), "cross_entropy", (X, y), batch_size=np.int64(7), max_samples=np.int64(20)
    )
    assert problem.num_samples() == 20


def test_unusable_data_is_refused():
    X, y = _data()
    with pytest.raises(curvkit.DataError):
        curvkit.Problem(_mlp(), "cross_entropy", 42)
    with pytest.raises(curvkit.DataError, match="number of samples"):
        curvkit.Problem(_mlp(), "cross_entropy", (X[:10], y[:11]))
    with pytest.raises(curvkit.DataError, match=r"^batch_size must be an integer >= 1, got 0$"):
        curvkit.Problem(_mlp(), "cross_entropy", (X, y), batch_size=0)
    with pytest.raises(curvkit.DataError, match=r"^max_samples must be an integer >= 1, got 0$"):
        curvkit.Problem(_mlp(), "cross_entropy", (X, y), max_samples=0)
    with pytest.raises(curvkit.DataError):
        curvkit.Problem(object(), "cross_entropy", (X, y))
    triples = curvkit.Problem(_mlp(), "cross_entropy", [(X, y, y)])
    with pytest.raises(curvkit.DataError, match="pair"):
        triples.loss_and_gradient()


@pytest.mark.parametrize("form", ["list-of-batches", "tensor-pair", "dataloader"])
def test_max_samples_cuts_the_last_batch(form):
    model, (X, y) = _mlp(), _data()
    data = {
        "list-of-batches": [(X[i : i + 6], y[i : i + 6]) for i in range(0, N, 6)],
        "tensor-pair": (X, y),
        "dataloader": DataLoader(TensorDataset(X, y), batch_size=6),
    }[form]
    problem = curvkit.Problem(model, "cross_entropy", data, batch_size=6, max_samples=15)
    assert [t.shape[0] for _, t in problem.data] == [6, 6, 3]
    assert problem.num_samples() == 15
    v = _vec(43)
    _assert_same(_curvkit(problem, v), _truth(model, F.cross_entropy, X[:15], y[:15], v))


@pytest.mark.parametrize("form", ["empty-list", "empty-pair", "empty-dataset"])
def test_empty_data_raise_data_error(form):
    X, y = _data()
    data = {"empty-list": [], "empty-pair": (X[:0], y[:0]), "empty-dataset": TensorDataset(X[:0], y[:0])}[
        form
    ]
    problem = curvkit.Problem(_mlp(), "cross_entropy", data)
    with pytest.raises(curvkit.DataError, match="no batch"):
        problem.loss_and_gradient()
    with pytest.raises(curvkit.DataError):
        curvkit.curvature("hessian", problem) @ _vec(43)


def test_all_targets_ignored_is_a_data_error():
    X, y = _data()
    problem = curvkit.Problem(
        _mlp(), nn.CrossEntropyLoss(ignore_index=-1), (X, torch.full_like(y, -1)), check_deterministic=False
    )
    with pytest.raises(curvkit.DataError, match="ignored"):
        problem.loss_and_gradient()


def test_rebatched_keeps_the_curvature_and_refuses_fixed_batches():
    model, (X, y) = _mlp(), _data()
    v = _vec(43)
    problem = curvkit.Problem(model, "cross_entropy", (X, y), batch_size=50)
    _assert_same(_curvkit(problem.rebatched(4), v), _curvkit(problem, v))
    assert problem.rebatched(4).batch_size == 4
    fixed = curvkit.Problem(model, "cross_entropy", DataLoader(TensorDataset(X, y), batch_size=6))
    with pytest.raises(curvkit.DataError):
        fixed.rebatched(3)


# --------------------------------------------------------------------------- wrong shapes
@pytest.mark.parametrize(
    ("loss", "inputs", "targets", "fragment"),
    [
        ("cross_entropy", torch.randn(10, 3, dtype=DT), torch.randint(0, 3, (10,)), "(10, 3)"),
        ("mse", torch.randn(10, 4, dtype=DT), torch.randn(10, 2, dtype=DT), "(10, 2)"),
        ("cross_entropy", torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10, 2)), "(10, 2)"),
        ("cross_entropy", torch.randn(10, 4, dtype=DT), torch.randint(5, 8, (10,)), "out of bounds"),
        ("bce_with_logits", torch.randn(10, 4, dtype=DT), torch.rand(10, 1, dtype=DT), "(10, 1)"),
        ("cross_entropy", torch.randn(10, 4, 1, dtype=DT), torch.randint(0, 3, (10,)), "(10, 4, 1)"),
    ],
    ids=["inputs-features", "mse-targets", "ce-targets-2d", "ce-targets-range", "bce-targets", "inputs-rank"],
)
def test_wrong_shapes_give_a_one_line_data_error(loss, inputs, targets, fragment):
    problem = curvkit.Problem(_mlp(), loss, (inputs, targets), check_deterministic=False)
    with pytest.raises(curvkit.DataError) as info:
        problem.loss_and_gradient()
    message = str(info.value)
    assert "\n" not in message
    assert fragment in message
    with pytest.raises(curvkit.DataError):
        curvkit.curvature("hessian", problem) @ _vec(43)


# --------------------------------------------------------------------------- parameters
def _deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    return model


@functools.cache
def _full_selection_truth():
    full = curvkit.Problem(_deep_mlp(), "cross_entropy", _data())
    return full, full.loss_and_gradient()[1], dense_hessian_reference(full)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")),
        ("2.weight", ("2.weight",)),
        (["4.bias", "0.weight"], ("0.weight", "4.bias")),
        ("*.bias", ("0.bias", "2.bias", "4.bias")),
        (["4", "0.*"], ("0.weight", "0.bias", "4.weight", "4.bias")),
        (["2", "2.weight", "*.weight"], ("0.weight", "2.weight", "2.bias", "4.weight")),
    ],
    ids=["all", "exact", "order", "glob", "prefix-and-glob", "overlapping"],
)
def test_parameter_selection(params, expected):
    model = _deep_mlp()
    X, y = _data()
    problem = curvkit.Problem(model, "cross_entropy", (X, y), params=params, batch_size=7)
    assert problem.param_names == expected
    named = dict(model.named_parameters())
    assert problem.dim == sum(named[n].numel() for n in expected)
    assert problem.layout.shapes == tuple(named[n].shape for n in expected)
    # the problem's gradient and HVP are the corresponding parts of the full ones
    full, g, H = _full_selection_truth()
    idx = full.layout.indices(expected)
    torch.testing.assert_close(problem.loss_and_gradient()[1], g[idx], rtol=1e-10, atol=1e-12)
    v = _vec(problem.dim)
    hv = curvkit.curvature("hessian", problem) @ v
    torch.testing.assert_close(hv, H[idx][:, idx] @ v, rtol=1e-10, atol=1e-12)


def test_parameters_that_do_not_require_grad_are_left_out_by_default():
    model = _deep_mlp()
    model[0].weight.requires_grad_(False)
    X, y = _data()
    problem = curvkit.Problem(model, "cross_entropy", (X, y))
    assert "0.weight" not in problem.param_names
    assert problem.param_names[0] == "0.bias"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(curvkit.ParameterSelectionError):
        curvkit.Problem(model, "cross_entropy", (X, y))


@pytest.mark.parametrize("params", ["nope", ["0.weight", "5.*"], "0.weigh"])
def test_unknown_parameter_pattern(params):
    with pytest.raises(curvkit.ParameterSelectionError) as info:
        curvkit.Problem(_deep_mlp(), "cross_entropy", _data(), params=params)
    assert "0.weight" in str(info.value)  # lists what is available


def test_empty_selection():
    with pytest.raises(curvkit.ParameterSelectionError):
        curvkit.Problem(_deep_mlp(), "cross_entropy", _data(), params=[])


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def test_tied_weights_are_listed_once_and_get_both_contributions():
    torch.manual_seed(0)
    model = _Tied().to(DT)
    X = torch.randn(12, 4, dtype=DT)
    Y = torch.randn(12, 4, dtype=DT)
    problem = curvkit.Problem(model, "mse", (X, Y), batch_size=5)
    assert problem.param_names == ("enc.weight", "enc.bias", "dec.bias")
    assert problem.dim == 16 + 4 + 4
    # independent truth: an explicit function of one shared matrix W
    W, b1, b2 = (model.enc.weight.detach().clone(), model.enc.bias.detach(), model.dec.bias.detach())

    def loss_of(flat):
        w, c1, c2 = flat[:16].reshape(4, 4), flat[16:20], flat[20:]
        return F.mse_loss(torch.tanh(X @ w.T + c1) @ w.T + c2, Y)

    theta = torch.cat([W.reshape(-1), b1, b2])
    g_true = torch.func.grad(loss_of)(theta)
    H_true = torch.autograd.functional.hessian(loss_of, theta)
    _, g = problem.loss_and_gradient()
    torch.testing.assert_close(g, g_true, rtol=1e-10, atol=1e-13)
    v = _vec(24)
    torch.testing.assert_close(curvkit.curvature("hessian", problem) @ v, H_true @ v, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- evaluation mode
def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3))
    model = model.to(DT)
    model[1].running_mean.copy_(torch.randn(5, dtype=DT) * 0.5)
    model[1].running_var.copy_(torch.rand(5, dtype=DT) + 0.5)
    return model


def test_eval_mode_uses_running_statistics_and_no_dropout():
    model = _bn_model()
    X, y = _data()
    model.train()
    model[4].eval()  # a mixed state, to be restored exactly
    modes = [m.training for m in model.modules()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    v = _vec(sum(p.numel() for p in model.parameters()))

    eval_copy = _bn_model().eval()
    want = _truth(eval_copy, F.cross_entropy, X, y, v)
    problem = curvkit.Problem(model, "cross_entropy", (X, y), batch_size=7)
    got = _curvkit(problem, v)
    _assert_same(got, want)
    # batch statistics or dropout would change the loss
    train_loss = F.cross_entropy(_bn_model().train()(X), y)
    assert abs(train_loss.item() - want[0].item()) > 1e-3

    assert [m.training for m in model.modules()] == modes
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k  # running statistics untouched


def test_training_flags_are_restored_after_an_error():
    model = _bn_model().train()
    problem = curvkit.Problem(model, "cross_entropy", (torch.randn(6, 3, dtype=DT), torch.zeros(6).long()))
    with pytest.raises(curvkit.DataError):
        problem.loss_and_gradient()
    assert all(m.training for m in model.modules())


def test_eval_mode_false_keeps_the_models_mode():
    model = _bn_model().eval()
    X, y = _data()
    v = _vec(sum(p.numel() for p in model.parameters()))
    problem = curvkit.Problem(model, "cross_entropy", (X, y), eval_mode=False, batch_size=7)
    _assert_same(_curvkit(problem, v), _truth(model, F.cross_entropy, X, y, v))
    assert not any(m.training for m in model.modules())


# --------------------------------------------------------------------------- determinism
def test_train_mode_dropout_is_detected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).to(DT).train()
    X, y = _data()
    problem = curvkit.Problem(model, "cross_entropy", (X, y), eval_mode=False)
    H = curvkit.curvature("hessian", problem)
    with pytest.raises(curvkit.NonDeterministicError) as info:
        H @ _vec(problem.dim)
    assert "check_deterministic=False" in str(info.value)
    with pytest.raises(curvkit.NonDeterministicError):
        problem.ensure_deterministic()
    opted_out = curvkit.Problem(model, "cross_entropy", (X, y), eval_mode=False, check_deterministic=False)
    out = curvkit.curvature("hessian", opted_out) @ _vec(problem.dim)
    assert out.shape == (problem.dim,) and torch.isfinite(out).all()


class _Augmented(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i] + 0.1 * torch.randn(self.X.shape[1], dtype=self.X.dtype), self.y[i]


def test_random_augmentation_is_detected():
    X, y = _data()
    torch.manual_seed(0)
    problem = curvkit.Problem(_mlp(), "cross_entropy", _Augmented(X, y), batch_size=16)
    with pytest.raises(curvkit.NonDeterministicError):
        curvkit.curvature("hessian", problem) @ _vec(43)
    opted_out = curvkit.Problem(_mlp(), "cross_entropy", _Augmented(X, y), check_deterministic=False)
    assert (curvkit.curvature("hessian", opted_out) @ _vec(43)).shape == (43,)


def test_deterministic_data_pass_the_probe():
    X, y = _data()
    problem = curvkit.Problem(_mlp(), "cross_entropy", _Pairs(X, y), batch_size=16)
    problem.ensure_deterministic()  # does not raise


# --------------------------------------------------------------------------- dtype
def test_to_float64_runs_a_double_precision_copy():
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X32 = torch.randn(N, 4)
    y = torch.randint(0, 3, (N,))
    p32 = curvkit.Problem(model32, "cross_entropy", (X32, y), batch_size=7)
    assert p32.dtype == torch.float32
    p64 = p32.to(torch.float64)
    assert p64.dtype == torch.float64
    assert p64.model is not model32
    assert all(p.dtype == torch.float32 for p in model32.parameters())  # original untouched
    inputs, targets = next(iter(p64.batches()))
    assert inputs.dtype == torch.float64 and targets.dtype == torch.int64
    assert p64.param_names == p32.param_names and p64.batch_size == 7

    model64 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    model64.load_state_dict({k: v.to(DT) for k, v in model32.state_dict().items()})
    v = _vec(43)
    want = _truth(model64, F.cross_entropy, X32.to(DT), y, v)
    got = _curvkit(p64, v)
    assert all(t.dtype == torch.float64 for t in got)
    _assert_same(got, want)
    # float32 products are close but not float64-exact
    got32 = curvkit.curvature("hessian", p32) @ v.float()
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want[2], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- torch.compile
_SEEDED = {"d3": {"seed": 0}, "ekfac": {"seed": 0}, "fisher": {"seed": 0}, "kfac": {"seed": 0}}


@pytest.mark.parametrize(
    "estimator", ["hessian", "ggn", "fisher", "empirical-fisher", "exact-hessian", "kfac", "ekfac", "d3"]
)
def test_a_compiled_model_has_the_curvature_of_its_original_module(estimator):
    """torch.compile's wrapper (OptimizedModule) computes its original module's function; its generated
    code cannot be differentiated twice (the Hessian raised torch's "non-empty donated buffers" error).
    Nothing is compiled here: the problem computes on the original module."""
    model, (X, y) = _mlp(), _data(n=12)
    compiled = torch.compile(model)
    problem = curvkit.Problem(compiled, "cross_entropy", (X, y), batch_size=5)
    reference = curvkit.Problem(model, "cross_entropy", (X, y), batch_size=5)
    V = torch.randn(43, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    options = _SEEDED.get(estimator, {})
    got = curvkit.curvature(estimator, problem, **options) @ V
    want = curvkit.curvature(estimator, reference, **options) @ V
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert problem.model is model
    assert problem.param_names == ("0.weight", "0.bias", "2.weight", "2.bias")  # no "_orig_mod." prefix


class _CompiledBody(nn.Module):
    """A model holding a compiled submodule (its parameters are named ``body._orig_mod.*``)."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = torch.compile(body), head

    def forward(self, x):
        return self.head(self.body(x))


def test_a_compiled_submodule_runs_eagerly_in_the_problem():
    """Its generated code has no double backward ("torch.compile with aot_autograd does not currently
    support double backward"); the problem runs it eagerly: the curvature of the uncompiled model."""
    model, (X, y) = _mlp(), _data(n=12)
    holder = _CompiledBody(model[:2], model[2])
    problem = curvkit.Problem(holder, "cross_entropy", (X, y), batch_size=5)
    assert problem.param_names == (
        "body._orig_mod.0.weight",
        "body._orig_mod.0.bias",
        "head.weight",
        "head.bias",
    )
    v = _vec(43)
    want = _truth(model, F.cross_entropy, X, y, v)
    _assert_same(_curvkit(problem, v), want)
