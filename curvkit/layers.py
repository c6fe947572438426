"""Layer rules: per-sample quantities of common layers from their inputs and output gradients.

For a layer ``z = W a + b`` applied to sample ``n``, the gradient of a scalar
``u^T o_n`` (``o_n`` the model's outputs for the sample, ``u`` a cotangent) with
respect to ``W`` is ``G_n^T A_n``, with ``A_n`` the layer's inputs (one row per
position the layer is applied at) and ``G_n = d(u^T o_n) / dz_n`` the gradient at
its outputs. A *layer rule* computes per-sample quantities from ``A`` and ``G``
alone, without differentiating per sample: the classic trick behind BackPACK
(F. Dangel, F. Kunstner and P. Hennig, "BackPACK: Packing more into backprop",
ICLR 2020) and per-example gradient norms (I. Goodfellow, "Efficient per-example
gradient computations", arXiv 1510.01799, 2015). With one position,

.. math:: \\sum_n (G_n^\\top A_n)^{\\circ 2} = (G^{\\circ 2})^\\top A^{\\circ 2},

one matrix product for all samples at once; with several positions (sequences,
convolution patches) the per-sample gradients are formed by a batched product
and squared.

:class:`LayerDiagonals` is the one user today: ``sum_{n,q} (J_n^T u_{nq})^2``,
the quantity behind every Gauss-Newton-family diagonal
(:func:`curvkit.jacobians.sum_of_squared_pullbacks`). One forward pass with hooks
captures the layers' inputs ``A`` and outputs, one (vectorised) backward pass per
cotangent gives the output gradients ``G``, and the rules do the rest. Parameters
of layers with a rule (``Linear``, ``Conv2d`` with zero padding, each called once
per forward pass, their parameters not tied to others) take it; all others the
generic per-sample pullback (:func:`curvkit.jacobians.per_sample_vjp`). The first
call checks every rule against autograd (the rule's per-sample gradients must
sum to the batch gradient) and sends a parameter whose rule disagrees (a weight
also used outside its layer, say) to the generic path for good.

The table :data:`LAYER_RULES` maps a module type to its rule; KFAC's factors
(the same ``A`` and ``G``) will read the same captures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.backends import without_tf32
from curvkit.choice import AUTO_TRIALS, Choice
from curvkit.errors import NonFiniteError
from curvkit.finite import all_finite
from curvkit.precision import rounding_tolerance
from curvkit.problem import Problem

__all__ = [
    "LAYER_RULES",
    "LayerBatch",
    "LayerCapture",
    "LayerDiagonals",
    "LayerRule",
    "contract_rows",
    "gradient_sums",
    "squared_gradient_sums",
]

CHUNK_BYTES = 2**28
"""Memory for the output gradients of one chunk of cotangents (256 MiB)."""


@dataclass(frozen=True)
class LayerRule:
    """How a layer type's per-sample parameter gradients follow from its inputs and output gradients.

    A rule brings the layer to one form, the per-sample weight gradient
    ``G_n A_n^T`` per group: inputs as ``A`` ``[N, groups, k, L]`` (``k`` inputs
    per group at each of ``L`` positions: a convolution's unfolded patches) and
    output gradients as ``G`` ``[N, Q, groups, o, L]``; the weight is ``[groups,
    o, k]`` reshaped, the bias ``[groups * o]``.

    Attributes:
        applies: ``module -> bool``: whether the rule covers this instance (its
            options, e.g. a convolution's padding mode).
        inputs: ``(module, a) -> A`` for the layer's input ``a`` ``[N, ...]``.
        grads: ``(module, g, A) -> G`` for its output gradients ``g`` ``[N, Q, ...]``
            (``Q`` cotangents per sample), given ``A`` (for its shape).
        shape: ``module -> (groups, o, k)``, known before any data is seen (for
            memory budgets).
    """

    applies: Callable[[nn.Module], bool]
    inputs: Callable[[nn.Module, Tensor], Tensor]
    grads: Callable[[nn.Module, Tensor, Tensor], Tensor]
    shape: Callable[[nn.Module], tuple[int, int, int]]

    def rows(self, module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, G)`` for a layer's input and output gradients."""
        A = self.inputs(module, a)
        return A, self.grads(module, g, A)


def squared_gradient_sums(A: Tensor, G: Tensor) -> dict[str, Tensor]:
    """``sum_{q,n}`` of the squared per-sample gradients of the weight and the bias.

    With one position, ``(G^2)^T (A^2)``: one product for all samples. Otherwise
    the per-sample gradients are formed by batched products, all cotangents of
    a sample at once (in chunks within :data:`CHUNK_BYTES`), and squared.

    Returns:
        ``{"weight": [groups, o, k], "bias": [groups * o]}``.
    """
    N, Q, groups, o, L = G.shape
    bias = G.sum(-1).square().sum((0, 1)).reshape(-1)
    if L == 1:
        G2 = G[..., 0].square().sum(1)  # [N, groups, o]
        return {"weight": torch.einsum("ngo,ngk->gok", G2, A[..., 0].square()), "bias": bias}
    k = A.shape[2]
    weight = A.new_zeros(groups, o, k)
    chunk = max(1, CHUNK_BYTES // max(N * groups * o * k * A.element_size(), 1))
    for start in range(0, Q, chunk):
        Gc = G[:, start : start + chunk]  # [N, q, groups, o, L]
        rows = Gc.transpose(1, 2).reshape(N, groups, -1, L)  # [N, groups, q * o, L]
        per_sample = torch.matmul(rows, A.transpose(-1, -2))  # [N, groups, q * o, k]
        weight += per_sample.square().sum(0).reshape(groups, -1, o, k).sum(1)
    return {"weight": weight, "bias": bias}


def gradient_sums(A: Tensor, G: Tensor) -> dict[str, Tensor]:
    """``sum_n`` of the per-sample gradients for one cotangent (``Q = 1``): the batch gradient."""
    return {"weight": contract_rows(G[:, 0], A), "bias": G[:, 0].sum((0, -1)).reshape(-1)}


def contract_rows(X: Tensor, Y: Tensor) -> Tensor:
    """``sum`` over the leading dims of ``X Y^T`` for ``[..., groups, m, L]`` and ``[..., groups, p, L]``.

    Returns ``[groups, m, p]``. With one position, one product over all leading
    dims at once; with several, batched products of the rows as they lie in
    memory (an ``einsum`` over the positions and the leading dims together would
    first copy them into one block), summed in chunks that keep the ``m x p``
    products within 64 MiB.
    """
    groups, m, L = X.shape[-3:]
    p = Y.shape[-2]
    X, Y = X.reshape(-1, groups, m, L), Y.reshape(-1, groups, p, L)
    if L == 1:
        return torch.einsum("xgk,xgj->gkj", X[..., 0], Y[..., 0])
    chunk = max(1, 2**26 // max(groups * m * p * X.element_size(), 1))
    total = X.new_zeros(groups, m, p)
    for start in range(0, X.shape[0], chunk):
        total += torch.matmul(X[start : start + chunk], Y[start : start + chunk].transpose(-1, -2)).sum(0)
    return total


# ------------------------------------------------------------------- Linear
def _linear_inputs(module: nn.Module, a: Tensor) -> Tensor:
    """``A`` ``[N, 1, in, T]``, ``T`` positions per sample (every leading dim after the first)."""
    return a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2).unsqueeze(1)


def _linear_grads(module: nn.Module, g: Tensor, A: Tensor) -> Tensor:
    """``G`` ``[N, Q, 1, out, T]``."""
    N, Q = g.shape[:2]
    return g.reshape(N, Q, A.shape[-1], g.shape[-1]).transpose(2, 3).unsqueeze(2)


# ------------------------------------------------------------------- Conv2d
def _conv_applies(module: nn.Module) -> bool:
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _conv_inputs(module: nn.Module, a: Tensor) -> Tensor:
    """Unfolded patches ``[N, groups, k, L]``."""
    patches = F.unfold(
        a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
    )  # [N, in * kh * kw, L]
    return patches.reshape(a.shape[0], module.groups, -1, patches.shape[-1])


def _conv_grads(module: nn.Module, g: Tensor, A: Tensor) -> Tensor:
    """Output gradients ``[N, Q, groups, o, L]``."""
    groups = module.groups
    return g.reshape(g.shape[0], g.shape[1], groups, module.out_channels // groups, A.shape[-1])


# ------------------------------------------------------------ normalisation
# An elementwise affine map ``y = x_hat * w + b``: one group per feature, ``o = k = 1``; A holds
# the normalised inputs ``x_hat``.
def _channels_first_inputs(normalised: Tensor, features: int) -> Tensor:
    return normalised.reshape(normalised.shape[0], features, 1, -1)


def _channels_first_grads(module: nn.Module, g: Tensor, A: Tensor) -> Tensor:
    return g.reshape(g.shape[0], g.shape[1], A.shape[1], 1, A.shape[-1])


def _channels_last_inputs(normalised: Tensor, features: int) -> Tensor:
    return normalised.reshape(normalised.shape[0], -1, features).transpose(1, 2).unsqueeze(2)


def _channels_last_grads(module: nn.Module, g: Tensor, A: Tensor) -> Tensor:
    N, Q = g.shape[:2]
    return g.reshape(N, Q, A.shape[-1], A.shape[1]).transpose(2, 3).unsqueeze(3)


def _batch_norm_applies(module: nn.Module) -> bool:
    """Evaluation mode with running statistics: every sample normalised on its own."""
    return module.affine and module.track_running_stats and not module.training


def _batch_norm_inputs(module: nn.Module, a: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (a.ndim - 2)
    mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
    return _channels_first_inputs((a - mean) / torch.sqrt(var + module.eps), module.num_features)


def _layer_norm_applies(module: nn.Module) -> bool:
    return module.elementwise_affine


def _layer_norm_inputs(module: nn.Module, a: Tensor) -> Tensor:
    dims = tuple(range(a.ndim - len(module.normalized_shape), a.ndim))
    mean = a.mean(dims, keepdim=True)
    var = a.var(dims, keepdim=True, correction=0)
    normalised = (a - mean) / torch.sqrt(var + module.eps)
    return _channels_last_inputs(normalised, math.prod(module.normalized_shape))


def _linear_shape(module: nn.Module) -> tuple[int, int, int]:
    return 1, module.out_features, module.in_features


def _conv_shape(module: nn.Module) -> tuple[int, int, int]:
    groups = module.groups
    return groups, module.out_channels // groups, module.in_channels // groups * math.prod(module.kernel_size)


def _batch_norm_shape(module: nn.Module) -> tuple[int, int, int]:
    return module.num_features, 1, 1


def _layer_norm_shape(module: nn.Module) -> tuple[int, int, int]:
    return math.prod(module.normalized_shape), 1, 1


_BATCH_NORM = LayerRule(_batch_norm_applies, _batch_norm_inputs, _channels_first_grads, _batch_norm_shape)

LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LayerRule(lambda m: True, _linear_inputs, _linear_grads, _linear_shape),
    nn.Conv2d: LayerRule(_conv_applies, _conv_inputs, _conv_grads, _conv_shape),
    nn.BatchNorm1d: LayerRule(
        _batch_norm_applies, _batch_norm_inputs, _channels_first_grads, _batch_norm_shape
    ),
    nn.BatchNorm2d: LayerRule(
        _batch_norm_applies, _batch_norm_inputs, _channels_first_grads, _batch_norm_shape
    ),
    nn.BatchNorm3d: LayerRule(
        _batch_norm_applies, _batch_norm_inputs, _channels_first_grads, _batch_norm_shape
    ),
    nn.LayerNorm: LayerRule(_layer_norm_applies, _layer_norm_inputs, _channels_last_grads, _layer_norm_shape),
}
"""Module type -> its rule (exact types: a subclass may change ``forward``)."""


# ------------------------------------------------------------------- capture
class _Capture:
    """Forward hooks that record each ruled module's input and output, and how often it ran.

    The hook hands the rest of the network a copy of the output, so that an
    in-place operation downstream (``ReLU(inplace=True)``) cannot change the
    captured tensor, whose gradient is the layer's output gradient.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = modules
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(modules, 0)
        self._handles: list[Any] = []

    def __enter__(self) -> _Capture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            self.calls[name] += 1
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                self.inputs[name], self.outputs[name] = args[0].detach(), output
                return output.clone()
            return None

        return hook


Layers = dict[str, tuple[nn.Module, dict[str, int]]]
"""Module name -> (module, {its parameter's local name: index among the selected parameters})."""


@dataclass
class LayerBatch:
    """One batch's forward pass with the covered layers' inputs captured.

    Attributes:
        outputs: The model's outputs (with their graph).
        cotangents: ``[N, Q, *o.shape[1:]]``, from the capture's ``cotangents_of``.
        inputs: Each covered layer's input.
        layers: The covered layers.
    """

    outputs: Tensor
    cotangents: Tensor
    inputs: dict[str, Tensor]
    layers: Layers
    layer_outputs: list[Tensor]
    rules: Mapping[type[nn.Module], LayerRule]
    batched: Choice
    _input_rows: dict[str, Tensor] = field(default_factory=dict)

    def input_rows(self, key: str) -> Tensor:
        """A covered layer's inputs in the rules' form, ``A`` ``[N, groups, k, L]`` (computed once)."""
        if key not in self._input_rows:
            module = self.layers[key][0]
            self._input_rows[key] = self.rules[type(module)].inputs(module, self.inputs[key])
        return self._input_rows[key]

    def rows(self) -> Iterator[tuple[str, nn.Module, dict[str, int], Tensor, Tensor]]:
        """``(name, module, params, A, G)`` per covered layer and chunk of cotangents.

        ``A`` and ``G`` in the rules' form (:class:`LayerRule`), ``G`` for the
        chunk's cotangents, chunks within :data:`CHUNK_BYTES` of output gradients.
        """
        if not self.layers or not self.outputs.requires_grad:
            return
        U = self.cotangents.movedim(1, 0)  # [Q, N, *o]
        per_cotangent = sum(z.numel() for z in self.layer_outputs) * U.element_size()
        chunk = max(1, CHUNK_BYTES // max(per_cotangent, 1))
        for start in range(0, U.shape[0], chunk):
            part = U[start : start + chunk]
            if len(part) == 1:  # one cotangent: a plain backward pass, nothing to vectorise
                grads = _output_gradients(self.outputs, self.layer_outputs, part, False)
            else:
                grads = self.batched(
                    lambda batched, part=part: _output_gradients(
                        self.outputs, self.layer_outputs, part, batched
                    ),
                    key=len(part),
                )
            for (key, (module, names)), g in zip(self.layers.items(), grads):
                A = self.input_rows(key)
                yield key, module, names, A, self.rules[type(module)].grads(module, g, A)


class LayerCapture:
    """Which layers a rule covers (decided on the first batch), and their inputs and output gradients.

    One object per operator. On its first batch it takes the candidate layers (a
    rule for the type that applies, selected parameters not tied to others), keeps
    those that ran exactly once in the forward pass and whose rule's per-sample
    gradients sum to autograd's batch gradient, and keeps that decision.

    Args:
        problem: The problem.
        rules: Module type -> rule (default :data:`LAYER_RULES`).

    Attributes:
        covered: After the first batch, the layers whose rules are used.
    """

    def __init__(self, problem: Problem, rules: Mapping[type[nn.Module], LayerRule] | None = None):
        self.problem = problem
        self.rules = dict(LAYER_RULES if rules is None else rules)
        self.covered: Layers | None = None
        # one vectorised backward pass for all cotangents, or a loop (see _output_gradients)
        self.batched: Choice[bool, list[Tensor]] = Choice((False, True), trials=AUTO_TRIALS)

    @contextlib.contextmanager
    def forward(
        self, params: Sequence[Tensor], inputs: Any, cotangents_of: Callable[[Tensor], Tensor]
    ) -> Iterator[LayerBatch]:
        """One batch's forward pass with hooks; gradients flow while the context is open.

        Args:
            params: The selected parameters.
            inputs: The batch's inputs.
            cotangents_of: ``outputs -> [N, Q, *o.shape[1:]]``: ``Q`` cotangents of
                each sample's outputs, given the (detached) outputs.
        """
        layers = self.candidates() if self.covered is None else self.covered
        if not layers:
            self.covered = {}
            with torch.no_grad():
                outputs = self.problem.forward([p.detach() for p in params], inputs)
            yield LayerBatch(outputs, cotangents_of(outputs), {}, {}, [], self.rules, self.batched)
            return
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad(), _Capture({k: m for k, (m, _) in layers.items()}) as capture:
            outputs = self.problem.forward(leaves, inputs)
            cotangents = cotangents_of(outputs.detach())
            layers = {k: v for k, v in layers.items() if capture.calls[k] == 1 and k in capture.outputs}
            batch = LayerBatch(
                outputs,
                cotangents,
                capture.inputs,
                layers,
                [capture.outputs[k] for k in layers],
                self.rules,
                self.batched,
            )
            if self.covered is None:
                self.covered = self._check(leaves, batch)
                kept = list(self.covered)
                batch.layers = self.covered
                batch.layer_outputs = [capture.outputs[k] for k in kept]
            yield batch

    def candidates(self) -> Layers:
        """The layers a rule may cover, their parameters selected and not tied to others.

        Called during the first pass over the data, in the mode the problem runs
        the model in (a BatchNorm rule needs evaluation mode).
        """
        problem = self.problem
        index = {name: i for i, name in enumerate(problem.param_names)}
        shared = _shared_parameter_names(problem.model)
        candidates: Layers = {}
        for prefix, module in problem.model.named_modules():
            rule = self.rules.get(type(module))
            if rule is None or not rule.applies(module):
                continue
            full = {
                local: f"{prefix}.{local}" if prefix else local
                for local, _ in module.named_parameters(recurse=False)
            }
            names = {local: index[n] for local, n in full.items() if n in index and n not in shared}
            if names:
                candidates[prefix] = (module, names)
        return candidates

    @without_tf32()
    def _check(self, leaves: list[Tensor], batch: LayerBatch) -> Layers:
        """The layers whose rule's summed per-sample gradients equal autograd's batch gradient.

        Both sides in full float32 (:func:`curvkit.backends.without_tf32`): cuDNN's convolution
        gradients in TF32 (its default on Ampere and later GPUs) differ from a rule's
        float32 by about 3e-4 of their largest entry, beyond the check's 1e-4.
        """
        layers, outputs = batch.layers, batch.outputs
        if not layers or not outputs.requires_grad:
            return {}
        u = torch.randn(outputs.shape, dtype=outputs.dtype, generator=torch.Generator().manual_seed(0))
        keys = list(layers)
        wanted = [leaves[i] for k in keys for i in layers[k][1].values()]
        grads = torch.autograd.grad(
            outputs,
            [*batch.layer_outputs, *wanted],
            u.to(outputs.device),
            retain_graph=True,
            allow_unused=True,
        )
        if not all_finite(grads):
            raise NonFiniteError(
                "the first batch's gradients are not finite: the layer rules cannot be checked against "
                "autograd on it"
            )
        truths = iter(grads[len(keys) :])
        kept: Layers = {}
        for key, g in zip(keys, grads[: len(keys)]):
            module, names = layers[key]
            sums = {}
            if g is not None:
                A = batch.input_rows(key)
                sums = gradient_sums(A, self.rules[type(module)].grads(module, g[:, None], A))
            good = {}
            for local, i in names.items():
                truth, mine = next(truths), sums.get(local)
                if truth is not None and mine is not None and _close(mine.reshape(truth.shape), truth):
                    good[local] = i
            if good:
                kept[key] = (module, good)
        return kept


class LayerDiagonals:
    """``sum_{n,q} (J_n^T u_{nq})^2`` for the parameters that layer rules cover.

    One object per operator (its :class:`LayerCapture` decides the layers once).

    Args:
        problem: The problem.
    """

    def __init__(self, problem: Problem):
        self.capture = LayerCapture(problem)

    @property
    def covered(self) -> Layers | None:
        """The layers whose rules are used (``None`` before the first batch)."""
        return self.capture.covered

    @covered.setter
    def covered(self, layers: Layers | None) -> None:
        self.capture.covered = layers

    def __call__(
        self, params: Sequence[Tensor], inputs: Any, cotangents_of: Callable[[Tensor], Tensor]
    ) -> tuple[dict[int, Tensor], Tensor, Tensor]:
        """One batch: the sums for the covered parameters, from one forward pass.

        Args:
            params: The selected parameters.
            inputs: The batch's inputs.
            cotangents_of: ``outputs -> [N, Q, *o.shape[1:]]``: ``Q`` cotangents of
                each sample's outputs, given the (detached) outputs.

        Returns:
            Parameter index -> the sum over samples and cotangents of its squared
            per-sample pullbacks (only the parameters a rule covers); the batch's
            outputs (detached); the cotangents.
        """
        out: dict[int, Tensor] = {}
        with self.capture.forward(params, inputs, cotangents_of) as batch:
            for _, _, names, A, G in batch.rows():
                squares = squared_gradient_sums(A, G)
                for local, i in names.items():
                    square = squares[local].reshape(params[i].shape)
                    out[i] = square if i not in out else out[i] + square
        return out, batch.outputs.detach(), batch.cotangents


def _output_gradients(outputs: Tensor, zs: list[Tensor], U: Tensor, batched: bool) -> list[Tensor]:
    """``d(u_q^T o)/dz`` for each layer output ``z`` and cotangent ``u_q``, as ``[N, Q, *z.shape[1:]]``.

    ``U`` is ``[Q, *outputs.shape]``. The loop stacks its results sample-major,
    so that the rules' reshapes of a convolution's gradients are views.
    """
    if batched:
        grads = torch.autograd.grad(
            outputs, zs, U, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return [
            (torch.zeros(U.shape[0], *z.shape, dtype=z.dtype, device=z.device) if g is None else g).movedim(
                0, 1
            )
            for g, z in zip(grads, zs)
        ]
    per_cotangent = [torch.autograd.grad(outputs, zs, u, retain_graph=True, allow_unused=True) for u in U]
    return [
        torch.stack([torch.zeros_like(z) if g[j] is None else g[j] for g in per_cotangent], dim=1)
        for j, z in enumerate(zs)
    ]


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal to the rounding of a sum of per-sample gradients (float32: 1e-4 of the largest entry)."""
    scale = max(b.abs().max().item(), a.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= rounding_tolerance(a.dtype) * scale


def _shared_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that appear under more than one name (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}
