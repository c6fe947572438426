"""The loss contract: counts, output Hessians and their factors, Fisher factors and sampled targets.

Every closed form is checked in float64 against independent truth: PyTorch's own
losses (sum over mean for the counts), autograd double backward of the batch
sum w.r.t. the outputs (the dense output Hessian), and the Fisher as an exact
expectation (enumerating classes or Bernoulli outcomes). Losses known only as
callables are checked against ``torch.func.jacfwd`` of ``torch.func.grad``.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.losses import (
    LOSS_NAMES,
    BinaryCrossEntropyWithLogits,
    CrossEntropy,
    CustomLoss,
    MeanSquaredError,
    NegativeLogLikelihood,
    resolve_loss,
)

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _classes(shape, classes, seed, ignore_index=None, every=3):
    targets = torch.randint(0, classes, shape, generator=_gen(seed))
    if ignore_index is not None:
        targets.view(-1)[::every] = ignore_index
    return targets


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """``name -> (torch.nn loss module, outputs, targets)``, outputs in float64."""
    g = _gen(0)
    logits = torch.randn(5, 4, generator=g, dtype=DT)
    spatial = torch.randn(3, 4, 2, 3, generator=g, dtype=DT)
    probs = torch.softmax(torch.randn(5, 4, generator=g, dtype=DT), dim=1)
    spatial_probs = torch.softmax(torch.randn(3, 4, 2, 3, generator=g, dtype=DT), dim=1)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    real = torch.randn(5, 3, generator=g, dtype=DT)
    bits = torch.randint(0, 2, (5, 3), generator=g).to(DT)
    pos_weight = torch.tensor([0.5, 2.0, 1.5], dtype=DT)
    element_weight = torch.rand(5, 3, generator=g, dtype=DT) + 0.5
    return {
        "ce": (nn.CrossEntropyLoss(), logits, _classes((5,), 4, 1)),
        "ce-probabilities": (nn.CrossEntropyLoss(), logits, probs),
        "ce-ignore": (nn.CrossEntropyLoss(ignore_index=1), logits, torch.tensor([1, 0, 1, 3, 2])),
        "ce-weight": (nn.CrossEntropyLoss(weight=weight), logits, _classes((5,), 4, 2)),
        "ce-smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), logits, _classes((5,), 4, 3)),
        "ce-weight-smoothing-ignore": (
            nn.CrossEntropyLoss(weight=weight, label_smoothing=0.3, ignore_index=-1),
            logits,
            _classes((5,), 4, 4, ignore_index=-1),
        ),
        "ce-probabilities-weight-smoothing": (
            nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
            logits,
            probs,
        ),
        "ce-spatial-weight-ignore": (
            nn.CrossEntropyLoss(weight=weight, ignore_index=-1),
            spatial,
            _classes((3, 2, 3), 4, 5, ignore_index=-1),
        ),
        "ce-spatial-ignore": (nn.CrossEntropyLoss(), spatial, _classes((3, 2, 3), 4, 6, ignore_index=-100)),
        "ce-spatial-probabilities": (nn.CrossEntropyLoss(), spatial, spatial_probs),
        "nll": (nn.NLLLoss(), torch.log_softmax(logits, 1), _classes((5,), 4, 7)),
        "nll-weight-ignore": (
            nn.NLLLoss(weight=weight, ignore_index=-1),
            torch.log_softmax(logits, 1),
            _classes((5,), 4, 8, ignore_index=-1),
        ),
        "nll-spatial-ignore": (
            nn.NLLLoss(ignore_index=2),
            torch.log_softmax(spatial, 1),
            _classes((3, 2, 3), 4, 9),
        ),
        "mse": (nn.MSELoss(), real, torch.randn(5, 3, generator=g, dtype=DT)),
        "mse-1d": (nn.MSELoss(), real[:, 0], torch.randn(5, generator=g, dtype=DT)),
        "bce": (nn.BCEWithLogitsLoss(), real, bits),
        "bce-soft-targets": (nn.BCEWithLogitsLoss(), real, torch.rand(5, 3, generator=g, dtype=DT)),
        "bce-pos-weight": (nn.BCEWithLogitsLoss(pos_weight=pos_weight), real, bits),
        "bce-pos-weight-weight": (
            nn.BCEWithLogitsLoss(pos_weight=pos_weight, weight=element_weight),
            real,
            bits,
        ),
    }


CASES = _cases()
# the negative log-likelihoods, and whether their Fisher is their output Hessian (canonical link; not
# where ignore_index names a class: sampled targets of that class are ignored too)
NLL_CASES = {
    "ce": True,
    "ce-probabilities": True,
    "ce-ignore": False,
    "ce-spatial-ignore": True,
    "ce-spatial-probabilities": True,
    "nll": False,
    "nll-spatial-ignore": False,
    "mse": True,
    "mse-1d": True,
    "bce": True,
    "bce-soft-targets": True,
}


def _case(name):
    module, outputs, targets = CASES[name]
    return resolve_loss(module), module, outputs.clone(), targets.clone()


def _summed(module: nn.Module) -> nn.Module:
    summed = copy.deepcopy(module)
    summed.reduction = "sum"
    return summed


def _dense_hessian_by_double_backward(batch_sum, outputs) -> torch.Tensor:
    """``d^2 S / do^2`` as an ``[M, M]`` matrix, one double-backward row per output entry."""
    leaf = outputs.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(batch_sum(leaf), leaf, create_graph=True)
    entries = leaf.numel()
    if not gradient.requires_grad:
        return torch.zeros(entries, entries, dtype=leaf.dtype)
    rows = [
        torch.autograd.grad(gradient.reshape(-1)[i], leaf, retain_graph=True, allow_unused=True)[0]
        for i in range(entries)
    ]
    return torch.stack([torch.zeros_like(leaf) if r is None else r for r in rows]).reshape(entries, entries)


def _blocks(factor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[N, P, C, C]``: ``F F^T`` per sample and position of a block-diagonal factor."""
    if len(shape) < 2:  # one 1 x 1 block per entry
        shape = torch.Size([shape.numel(), 1])
    n, c = shape[:2]
    per_position = factor.reshape(n, c, math.prod(shape[2:]), -1)
    return torch.einsum("ncpr,ndpr->npcd", per_position, per_position)


def _dense_from_blocks(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The block-diagonal ``[M, M]`` matrix over the outputs' row-major entries."""
    n, positions, c, _ = blocks.shape
    dense = torch.zeros(n, c, positions, n, c, positions, dtype=blocks.dtype)
    for i, p in itertools.product(range(n), range(positions)):
        dense[i, :, p, i, :, p] = blocks[i, p]
    return dense.reshape(shape.numel(), shape.numel())


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("name", list(CASES))
def test_sum_and_count_are_pytorchs_sum_and_what_its_mean_divides_by(name):
    loss, module, outputs, targets = _case(name)
    total, count = loss.sum_and_count(outputs, targets)
    assert isinstance(count, float) and loss.count(outputs, targets) == count
    _assert_close(total, _summed(module)(outputs, targets))
    mean = module(outputs, targets)
    assert count == pytest.approx((_summed(module)(outputs, targets) / mean).item(), rel=1e-12)
    _assert_close(loss(outputs, targets), mean)  # called, it is the module's own reduction


def test_a_weighted_cross_entropy_is_the_weighted_mean_over_the_whole_dataset():
    # before the weights were honoured, a weighted loss fell back to per-batch means
    g = _gen(11)
    X, y = torch.randn(30, 3, generator=g, dtype=DT), _classes((30,), 4, 12, ignore_index=-1, every=4)
    model = nn.Linear(3, 4).to(DT)
    module = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 5.0, 1.0, 2.0], dtype=DT), ignore_index=-1)
    loss, _ = curvkit.Problem(model, module, (X, y), batch_size=7).loss_and_gradient()
    torch.testing.assert_close(loss, module(model(X), y).detach(), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- output Hessian
@pytest.mark.parametrize("name", list(CASES))
def test_output_hessian_product_matches_double_backward(name):
    loss, module, outputs, targets = _case(name)
    hessian = _dense_hessian_by_double_backward(lambda o: _summed(module)(o, targets), outputs)
    V = torch.randn(3, *outputs.shape, generator=_gen(1), dtype=DT)
    want = (V.reshape(3, -1) @ hessian).reshape(V.shape)  # H is symmetric
    _assert_close(loss.output_hessian_product(outputs, targets, V), want)


@pytest.mark.parametrize("name", list(CASES))
def test_output_hessian_factor_reproduces_the_dense_hessian_block_by_block(name):
    loss, module, outputs, targets = _case(name)
    assert loss.BLOCK_DIAGONAL
    hessian = _dense_hessian_by_double_backward(lambda o: _summed(module)(o, targets), outputs)
    factor = loss.output_hessian_factor(outputs, targets)
    columns = outputs.shape[1] if outputs.ndim >= 2 else 1
    assert factor.shape == (*outputs.shape, columns) and not factor.requires_grad
    _assert_close(_dense_from_blocks(_blocks(factor, outputs.shape), outputs.shape), hessian)


# --------------------------------------------------------------------------- Fisher
def _exact_fisher_blocks(name, loss, outputs, targets) -> torch.Tensor:
    """``E_{y ~ p(y|o)}[g g^T]`` per sample and position, by enumerating the outcomes ``y``."""
    leaf = outputs.detach().requires_grad_(True)
    if isinstance(loss, CrossEntropy | NegativeLogLikelihood):
        p = torch.softmax(outputs, dim=1)
        classes = outputs.shape[1]
        kept = targets != loss.ignore_index if not targets.is_floating_point() else None
        expectation = 0.0
        for y in range(classes):
            sampled = torch.full(outputs.shape[:1] + outputs.shape[2:], y)
            if kept is not None:
                sampled = torch.where(kept, sampled, loss.ignore_index)
            (g,) = torch.autograd.grad(loss.sum_and_count(leaf, sampled)[0], leaf)
            gg = torch.einsum("nc...,nd...->n...cd", g, g).reshape(len(g), -1, classes, classes)
            expectation = expectation + p[:, y].reshape(len(g), -1, 1, 1) * gg
        return expectation
    if isinstance(loss, BinaryCrossEntropyWithLogits):  # all 2^C outcomes of each sample's row
        s = torch.sigmoid(outputs)
        expectation = 0.0
        for outcome in itertools.product([0.0, 1.0], repeat=outputs.shape[1]):
            y = torch.tensor(outcome, dtype=DT).expand_as(outputs)
            probability = torch.where(y == 1, s, 1 - s).prod(dim=1)
            (g,) = torch.autograd.grad(loss.sum_and_count(leaf, y)[0], leaf)
            expectation = expectation + probability[:, None, None] * torch.einsum("nc,nd->ncd", g, g)
        return expectation.unsqueeze(1)
    assert isinstance(loss, MeanSquaredError)  # Gaussian of variance 1/2: E[(2 sigma eps)^2] = 2, independent
    n, c = outputs.shape[:2] if outputs.ndim >= 2 else (outputs.numel(), 1)
    return 2 * torch.eye(c, dtype=DT).expand(n, math.prod(outputs.shape[2:]), c, c)


@pytest.mark.parametrize("name", list(NLL_CASES))
def test_fisher_factor_is_the_exact_expectation_over_the_predictive_distribution(name):
    loss, _, outputs, targets = _case(name)
    assert loss.is_negative_log_likelihood
    factor = loss.fisher_factor(outputs, targets)
    _assert_close(_blocks(factor, outputs.shape), _exact_fisher_blocks(name, loss, outputs, targets))
    if NLL_CASES[name]:  # canonical link: the Fisher is the output Hessian, the MC Fisher estimates the GGN
        _assert_close(factor, loss.output_hessian_factor(outputs, targets))


@pytest.mark.parametrize("name", sorted(set(CASES) - set(NLL_CASES)))
def test_losses_with_weights_or_smoothing_are_no_negative_log_likelihood(name):
    loss, _, outputs, targets = _case(name)
    assert not loss.is_negative_log_likelihood
    with pytest.raises(curvkit.NotNegativeLogLikelihoodError, match=r"weight=|label_smoothing="):
        loss.fisher_factor(outputs, targets)
    with pytest.raises(curvkit.NotNegativeLogLikelihoodError):
        loss.sample_targets(outputs, targets, _gen(0))


# --------------------------------------------------------------------------- sampled targets
@pytest.mark.parametrize("name", list(NLL_CASES))
def test_sample_targets_have_the_targets_conventions_and_follow_the_seed(name):
    loss, _, outputs, targets = _case(name)
    sampled = loss.sample_targets(outputs.requires_grad_(True), targets, _gen(3))
    assert torch.equal(sampled, loss.sample_targets(outputs, targets, _gen(3)))
    assert not sampled.requires_grad
    if isinstance(loss, MeanSquaredError | BinaryCrossEntropyWithLogits):
        assert sampled.shape == outputs.shape and sampled.dtype == outputs.dtype
        if isinstance(loss, BinaryCrossEntropyWithLogits):
            assert set(sampled.unique().tolist()) <= {0.0, 1.0}
    else:  # class indices, also for probability targets; ignored positions stay ignored
        assert sampled.shape == outputs.shape[:1] + outputs.shape[2:] and sampled.dtype == torch.long
        ignored = ~loss._kept(targets)
        assert torch.all(sampled[ignored] == loss.ignore_index)
        assert torch.all((sampled[~ignored] >= 0) & (sampled[~ignored] < outputs.shape[1]))
    loss.sum_and_count(outputs, sampled)  # the loss accepts them


@pytest.mark.montecarlo
@pytest.mark.parametrize(
    "name", ["ce-ignore", "ce-spatial-probabilities", "nll-spatial-ignore", "mse", "bce"]
)
def test_sampled_gradients_match_the_fisher_factor_in_expectation(name):
    loss, _, outputs, targets = _case(name)
    draws = 3000
    repeated_outputs = outputs.repeat(draws, *[1] * (outputs.ndim - 1)).requires_grad_(True)
    repeated_targets = targets.repeat(draws, *[1] * (targets.ndim - 1))
    sampled = loss.sample_targets(repeated_outputs, repeated_targets, _gen(2024))
    (g,) = torch.autograd.grad(loss.sum_and_count(repeated_outputs, sampled)[0], repeated_outputs)
    n, c = outputs.shape[:2]
    g = g.reshape(draws, n, c, -1)
    outer = torch.einsum("sncp,sndp->snpcd", g, g)
    mean, spread = outer.mean(dim=0), outer.std(dim=0) / math.sqrt(draws)
    want = _blocks(loss.fisher_factor(outputs, targets), outputs.shape)
    assert torch.all((mean - want).abs() <= 5 * spread + 1e-12), (mean - want).abs().max()


# --------------------------------------------------------------------------- losses known as callables
def _huber(outputs, targets, beta=0.5):
    return F.smooth_l1_loss(outputs, targets, beta=beta)


def _coupled(outputs, targets):
    """Convex but not separable over samples: the squared error of the batch's summed outputs."""
    return ((outputs - targets).sum(dim=0) ** 2).sum() / outputs.shape[0]


GENERIC = {
    "huber-lambda": lambda o, t: _huber(o, t),
    "smooth-l1-module": nn.SmoothL1Loss(beta=0.5),
    "coupled-function": _coupled,
}


@pytest.mark.parametrize("name", list(GENERIC))
def test_callable_losses_get_their_output_hessian_and_factor_by_autograd(name):
    fn = GENERIC[name]
    loss = resolve_loss(fn)
    g = _gen(5)
    outputs, targets = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)
    assert isinstance(loss, CustomLoss) and not loss.BLOCK_DIAGONAL and not loss.is_negative_log_likelihood
    assert loss.count(outputs, targets) == 4.0
    truth = torch.func.jacfwd(torch.func.grad(lambda o: 4 * fn(o, targets)))(outputs).reshape(12, 12)
    if name != "coupled-function":  # smooth L1: 1/beta per entry inside the quadratic zone, scaled by n/numel
        inside = ((outputs - targets).abs() < 0.5).to(DT).reshape(-1)
        _assert_close(truth, torch.diag(inside * 4 / 12 / 0.5))
    V = torch.randn(2, 4, 3, generator=g, dtype=DT)
    _assert_close(
        loss.output_hessian_product(outputs, targets, V), (V.reshape(2, 12) @ truth).reshape(V.shape)
    )
    factor = loss.output_hessian_factor(outputs, targets)
    assert factor.shape == (4, 3, 12)
    _assert_close(factor.reshape(12, 12) @ factor.reshape(12, 12).T, truth)


def test_a_loss_not_convex_in_the_outputs_has_no_factor():
    def concave(outputs, targets):
        return -((outputs - targets) ** 2).mean()

    loss = resolve_loss(concave)
    outputs, targets = torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    with pytest.raises(curvkit.NonConvexLossError, match="'concave'") as info:
        loss.output_hessian_factor(outputs, targets)
    assert "\n" not in str(info.value)
    bce = BinaryCrossEntropyWithLogits(pos_weight=torch.tensor([0.1], dtype=DT))
    with pytest.raises(curvkit.NonConvexLossError, match="out of range"):  # targets of 3: negative curvature
        bce.output_hessian_factor(torch.zeros(2, 1, dtype=DT), torch.full((2, 1), 3.0, dtype=DT))
    probabilities = torch.tensor([[1.5, -1.0], [0.5, 0.5]], dtype=DT)  # a negative total in the first row
    with pytest.raises(curvkit.NonConvexLossError, match="out of range"):
        CrossEntropy(weight=[1.0, 2.0]).output_hessian_factor(torch.zeros(2, 2, dtype=DT), probabilities)


def test_the_dense_factor_of_a_callable_loss_has_a_size_limit():
    loss = CustomLoss(_huber, name="huber")
    loss.max_dense_outputs = 5
    with pytest.raises(curvkit.DenseTooLargeError, match="'huber'.* 6 output entries") as info:
        loss.output_hessian_factor(torch.zeros(2, 3, dtype=DT), torch.ones(2, 3, dtype=DT))
    assert "\n" not in str(info.value)


def test_a_callable_without_sampler_is_refused_by_the_fisher_with_the_alternatives():
    def my_loss(outputs, targets):
        return F.mse_loss(outputs, targets)

    loss = resolve_loss(my_loss)
    outputs, targets = torch.zeros(2, 3, dtype=DT), torch.ones(2, 3, dtype=DT)
    for ask in (
        lambda: loss.fisher_factor(outputs, targets),
        lambda: loss.sample_targets(outputs, targets, _gen(0)),
    ):
        with pytest.raises(curvkit.NotNegativeLogLikelihoodError) as info:
            ask()
        message = str(info.value)
        assert isinstance(info.value, curvkit.CurvkitError) and "\n" not in message
        for fragment in ("'my_loss'", "'fisher'", "mode='mc'", "mode='exact'", "'ggn'", "'empirical-fisher'"):
            assert fragment in message
        assert "sample_targets" in message and "CustomLoss" in message


def test_a_custom_loss_with_a_sampler_is_a_negative_log_likelihood():
    def gaussian(outputs, targets):
        return ((outputs - targets) ** 2).sum(dim=1).mean()

    def draw(outputs, targets, generator):
        return outputs + 0.5**0.5 * torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)

    loss = CustomLoss(gaussian, sample_targets=draw, name="gaussian-nll")
    assert resolve_loss(loss) is loss and loss.is_negative_log_likelihood and loss.name == "gaussian-nll"
    outputs, targets = torch.randn(4, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    torch.testing.assert_close(
        loss.sample_targets(outputs, targets, _gen(7)), draw(outputs, targets, _gen(7))
    )
    with pytest.raises(curvkit.NoExactFisherError, match="mode='mc'"):
        loss.fisher_factor(outputs, targets)
    summed = resolve_loss(loss, reduction="sum")
    assert summed.reduction == "sum" and summed.sampler is draw and loss.reduction == "mean"
    problem = curvkit.Problem(
        nn.Linear(3, 2).to(DT), loss, (torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT))
    )
    assert problem.loss is loss


# --------------------------------------------------------------------------- names and options
@pytest.mark.parametrize(
    ("loss", "name"),
    [
        (nn.CrossEntropyLoss(), "cross_entropy"),
        (nn.CrossEntropyLoss(ignore_index=1), "cross_entropy(ignore_index=1)"),
        (
            nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.5]), label_smoothing=0.1),
            "cross_entropy(weight=[1, 2.5], label_smoothing=0.1)",
        ),
        (nn.NLLLoss(ignore_index=-1), "nll(ignore_index=-1)"),
        (nn.MSELoss(reduction="sum"), "mse"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0])), "bce_with_logits(pos_weight=[2])"),
        (nn.BCEWithLogitsLoss(weight=torch.ones(3)), "bce_with_logits(weight=[1, 1, 1])"),
        ("nll", "nll"),
        (nn.SmoothL1Loss(), "SmoothL1Loss"),
    ],
)
def test_a_loss_with_options_is_named_after_them(loss, name):
    assert resolve_loss(loss).name == name


def test_options_are_visible_and_long_weights_get_a_digest():
    loss = resolve_loss(nn.CrossEntropyLoss(ignore_index=1, label_smoothing=0.2))
    assert dict(loss.options) == {"ignore_index": 1, "weight": None, "label_smoothing": 0.2}
    with pytest.raises(TypeError):
        loss.options["ignore_index"] = 2  # read-only
    assert resolve_loss("mse").options == {} and resolve_loss("cross_entropy").options["ignore_index"] == -100
    weight = torch.ones(20)
    name = resolve_loss(nn.CrossEntropyLoss(weight=weight)).name
    assert name.startswith("cross_entropy(weight=[20 values, sha256 ")
    weight[7] = 2.0
    assert resolve_loss(nn.CrossEntropyLoss(weight=weight)).name != name
    assert set(LOSS_NAMES) == {"cross_entropy", "nll", "mse", "bce_with_logits"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: CrossEntropy(label_smoothing=1.5),
        lambda: CrossEntropy(weight=torch.tensor([1.0, -1.0])),
        lambda: NegativeLogLikelihood(weight=torch.ones(2, 2)),
        lambda: BinaryCrossEntropyWithLogits(pos_weight=torch.tensor([-2.0])),
        lambda: MeanSquaredError(reduction="none"),
        lambda: CustomLoss(3),
    ],
    ids=[
        "smoothing-range",
        "negative-weight",
        "weight-2d",
        "negative-pos-weight",
        "reduction",
        "not-callable",
    ],
)
def test_invalid_options_are_refused(make):
    with pytest.raises(curvkit.UnknownLossError):
        make()


def test_bad_vectors_and_targets_are_refused_in_one_line():
    loss = CrossEntropy()
    outputs = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(curvkit.ShapeMismatchError):
        loss.output_hessian_product(outputs, torch.tensor([0, 1]), torch.zeros(1, 3, 2, dtype=DT))
    for targets in (torch.tensor([0, 3]), torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]])):
        with pytest.raises(curvkit.UnknownLossError) as info:
            loss.output_hessian_factor(outputs, targets)
        assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["ce-spatial-ignore", "mse", "bce"])
def test_a_cpu_generator_samples_the_same_targets_for_cuda_outputs(name):
    loss, _, outputs, targets = _case(name)
    on_cpu = loss.sample_targets(outputs, targets, _gen(9))
    on_cuda = loss.sample_targets(outputs.cuda(), targets.cuda(), _gen(9))
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu)
    _assert_close(
        loss.output_hessian_factor(outputs.cuda(), targets.cuda()).cpu(),
        loss.output_hessian_factor(outputs, targets),
    )
