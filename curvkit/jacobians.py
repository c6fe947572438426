"""Products with the Jacobian of a problem's model outputs, one batch at a time.

For a batch with inputs ``x``, outputs ``o = f(theta, x)`` (through
:meth:`~curvkit.Problem.forward`) and Jacobian ``J = do / dtheta``, the
Gauss-Newton family of curvatures is ``J^T M J`` for a curvature ``M`` of the loss
w.r.t. the outputs (N. N. Schraudolph, "Fast curvature matrix-vector products for
second-order gradient descent", Neural Computation 14(7), 2002; J. Martens, "New
insights and perspectives on the natural gradient method", JMLR 21, 2020):

* :func:`output_curvature_batch_product`: ``J^T M J V`` for ``K`` directions:
  ``J V`` by forward mode (:func:`torch.func.jvp`, vectorised over the ``K``
  columns with :func:`torch.func.vmap`), ``M`` in output space, then ``J^T`` by
  reverse mode (the vector-Jacobian product of the same forward pass, vectorised
  over ``K``). Where :mod:`torch.func` cannot transform the model (an operator
  without a forward-mode derivative raises ``NotImplementedError``, e.g. the
  oneDNN LSTM kernel on CPU in float32; a ``torch.autograd.Function`` without
  ``setup_context`` or an in-place write into an untransformed tensor raise
  ``RuntimeError``), plain autograd does both: ``J v = d/du <J^T u, v>`` (the
  double-vjp trick: ``J^T u`` is linear in ``u``), and one backward pass per
  column. Both are offered as ways (``"forward"`` and ``"reverse"``); an
  estimator's ``strategy="auto"`` times them on its first products and keeps the
  faster per number of directions (:class:`curvkit.choice.Choice`), the
  ``"reverse"`` way also being the fallback where ``"forward"`` fails (on small
  dense models on CPU it is often the faster: see ``benchmarks/RESULTS.md``).
  :func:`ggn_batch_product` is the case ``M = d^2 S_b / do^2``.
* :func:`factor_product`: ``F F^T U`` for a loss's factor ``F`` in the layout of
  :class:`~curvkit.losses.BatchLoss` (block-diagonal per sample and position, or
  one block for the batch).
* :func:`per_sample_vjp` and :func:`per_sample_gradients`: ``J_n^T u`` for every
  sample ``n`` of the batch, by :func:`torch.func.vmap` over the samples of the
  vector-Jacobian product of the model applied to that sample alone (a batch of
  one), or by a loop over samples with plain autograd where ``vmap`` fails. The
  per-sample gradient of the sum ``s_n`` of sample ``n``'s loss terms is
  ``g_n = J_n^T ds_n/do_n``, with ``dS_b/do`` taken once for the whole batch
  (:func:`output_gradient`): the loss's validation and counting, which depend on
  the data, never run under ``vmap``. This needs a loss that is a sum over the
  outputs' first dimension (every closed form; a callable is taken to be one) and
  samples that do not interact in the model (:func:`samples_interact`).
* :func:`factor_batch_diagonal`: ``diag(J^T F F^T J)`` as the sum over the
  factor's columns of squared vector-Jacobian products, per sample and position
  for a block-diagonal factor.

Every function here is pure: a batch's contribution from the parameters, the
batch and the directions; the estimators plug them into the template of
:class:`~curvkit.ProblemOperator`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from curvkit.errors import CurvkitError
from curvkit.layers import LayerDiagonals
from curvkit.losses import BatchLoss
from curvkit.problem import Problem

__all__ = [
    "OUTPUT_SPACE_WAYS",
    "OutputCurvature",
    "check_independent_samples",
    "factor_batch_diagonal",
    "factor_cotangents",
    "factor_product",
    "ggn_batch_product",
    "monte_carlo_factor",
    "output_curvature_batch_product",
    "output_gradient",
    "output_vjp",
    "per_sample_gradients",
    "per_sample_vjp",
    "samples_interact",
    "sum_of_squared_pullbacks",
]

OutputCurvature = Callable[[Tensor, Tensor], Tensor]
"""``(outputs, U) -> M U``: a curvature w.r.t. the outputs applied to ``U`` of shape ``[K, *o.shape]``."""

OUTPUT_SPACE_WAYS = ("forward", "reverse")
"""Ways of :func:`output_curvature_batch_product`, the preferred first."""

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_VJP_CHUNK = 64  # columns per batch of whole-batch vector-Jacobian products in a diagonal
PULLBACK_CHUNK_BYTES = 2**28
"""Memory for one chunk of generic per-sample pullbacks in :func:`sum_of_squared_pullbacks` (256 MiB)."""


# ----------------------------------------------------------------- samples
def samples_interact(problem: Problem) -> bool:
    """Whether the model couples the samples of a batch (BatchNorm in training mode).

    Only with ``eval_mode=False``: in evaluation mode BatchNorm uses its running
    statistics and every sample's outputs depend on that sample alone.
    """
    return not problem.eval_mode and any(
        isinstance(m, _BATCH_NORMS) and m.training for m in problem.model.modules()
    )


def check_independent_samples(problem: Problem, what: str) -> None:
    """Refuse per-sample quantities of a model whose samples interact.

    Raises:
        CurvkitError: :func:`samples_interact` (``what`` names the quantity).
    """
    if samples_interact(problem):
        raise CurvkitError(
            f"{what} needs per-sample gradients, but the model couples the samples of a batch "
            "(BatchNorm in training mode, with eval_mode=False): build the problem with eval_mode=True"
        )


def _one_sample(x: Any) -> Any:
    """A sample's inputs as a batch of one (tensors or dicts of tensors)."""
    if isinstance(x, Mapping):
        return {k: v.unsqueeze(0) for k, v in x.items()}
    return x.unsqueeze(0)


def _sample(x: Any, n: int) -> Any:
    """Sample ``n`` of a batch's inputs, as a batch of one."""
    if isinstance(x, Mapping):
        return {k: v[n : n + 1] for k, v in x.items()}
    return x[n : n + 1]


# --------------------------------------------------------- output space
def output_gradient(loss: BatchLoss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``dS_b / do``: the gradient of the batch's summed loss w.r.t. the (detached) outputs.

    Row ``n`` is ``ds_n / do_n`` for a loss that sums over samples.
    """
    leaf = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        total = loss.sum_of_terms(leaf, targets)
        if not total.requires_grad:
            return torch.zeros_like(leaf)
        (gradient,) = torch.autograd.grad(total, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if gradient is None else gradient


def factor_product(factor: Tensor, U: Tensor, block_diagonal: bool) -> Tensor:
    """``F F^T U`` for a factor ``F`` of shape ``[*o.shape, R]`` and ``U`` of shape ``[K, *o.shape]``.

    With ``block_diagonal`` (see :class:`~curvkit.losses.BatchLoss`) the blocks
    are per sample and position, over dim 1 (per entry for outputs of fewer than
    two dims); otherwise ``F`` is one ``[M, R]`` factor of the whole batch.

    >>> F = torch.tensor([[[1.0], [2.0]]])  # one sample, two outputs, R = 1
    >>> factor_product(F, torch.tensor([[[1.0, 0.0]]]), block_diagonal=True)
    tensor([[[1., 2.]]])
    """
    if not block_diagonal:
        flat = factor.reshape(-1, factor.shape[-1])  # [M, R]
        return ((U.reshape(U.shape[0], -1) @ flat) @ flat.T).reshape(U.shape)
    if factor.ndim < 3:  # outputs [N] or scalar: one 1 x 1 block per entry
        return U * factor.square().sum(-1)
    F = factor.unsqueeze(0)  # [1, N, C, *pos, R]
    coefficients = (F * U.unsqueeze(-1)).sum(dim=2, keepdim=True)  # F^T U per block: [K, N, 1, *pos, R]
    return (F * coefficients).sum(-1)


# ---------------------------------------------------------------- products
def output_vjp(outputs: Tensor, leaves: Sequence[Tensor], U: Tensor) -> list[Tensor]:
    """``J^T u`` for each of the ``K`` cotangents ``U[k]``: one backward pass each, graph kept.

    Returns:
        Per leaf, the ``[K, *shape]`` products (zeros where the outputs do not depend on it).
    """
    out = [leaf.new_zeros(U.shape[0], *leaf.shape) for leaf in leaves]
    if not outputs.requires_grad:
        return out
    for k in range(U.shape[0]):
        grads = torch.autograd.grad(outputs, leaves, U[k], retain_graph=True, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                out[i][k] = g
    return out


def _reverse_jvp(outputs: Tensor, leaves: Sequence[Tensor], V: Sequence[Tensor]) -> Tensor:
    """``J V`` by the double-vjp trick ``J v = d/du <J^T u, v>``: ``[K, *outputs.shape]``."""
    K = V[0].shape[0]
    JV = outputs.new_zeros(K, *outputs.shape)
    if not outputs.requires_grad:
        return JV
    u = torch.zeros_like(outputs, requires_grad=True)
    grads = torch.autograd.grad(outputs, leaves, u, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not used:
        return JV
    for k in range(K):
        (jv,) = torch.autograd.grad(
            [grads[i] for i in used], u, [V[i][k] for i in used], retain_graph=True, allow_unused=True
        )
        if jv is not None:
            JV[k] = jv
    return JV


def output_curvature_batch_product(
    problem: Problem,
    params: Sequence[Tensor],
    inputs: Any,
    targets: Tensor,
    V: Sequence[Tensor],
    curvature: OutputCurvature,
    way: str = "forward",
) -> tuple[list[Tensor], float]:
    """One batch's ``J^T M J V`` and its count ``c_b``, for ``M`` applied by ``curvature``.

    Args:
        problem: Provides the model call and the loss (for the count).
        params: The selected parameters (detached).
        inputs: The batch's inputs.
        targets: The batch's targets.
        V: Per parameter, ``[K, *shape]`` directions.
        curvature: ``(outputs, U) -> M U`` for ``U`` of shape ``[K, *outputs.shape]``
            (the outputs detached).
        way: ``"forward"``: forward mode and a pullback with :mod:`torch.func`
            (vectorised over the ``K`` columns when ``K > 1``); ``"reverse"``: plain
            autograd, the double-vjp trick and a loop over the columns (see the
            module docstring).

    Returns:
        Per parameter, the ``[K, *shape]`` products, and the batch's count.
    """
    if way not in OUTPUT_SPACE_WAYS:
        raise CurvkitError(f"unknown way {way!r}; use one of {list(OUTPUT_SPACE_WAYS)}")
    params = tuple(p.detach() for p in params)
    if way == "forward":

        def model(*ps: Tensor) -> Tensor:
            return problem.forward(ps, inputs)

        outputs, pullback = vjp(model, *params)
        if V[0].shape[0] == 1:  # no vmap for one direction: it only adds overhead
            JV = jvp(model, params, tuple(v[0] for v in V))[1].unsqueeze(0)
            products = [p.unsqueeze(0) for p in pullback(curvature(outputs.detach(), JV)[0])]
        else:
            JV = vmap(lambda *v: jvp(model, params, v)[1])(*V)
            products = list(vmap(pullback)(curvature(outputs.detach(), JV)))
    else:
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            outputs = problem.forward(leaves, inputs)
            JV = _reverse_jvp(outputs, leaves, V)
            products = output_vjp(outputs, leaves, curvature(outputs.detach(), JV))
    return products, problem.loss.count(outputs.detach(), targets)


def ggn_batch_product(
    problem: Problem,
    params: Sequence[Tensor],
    inputs: Any,
    targets: Tensor,
    V: Sequence[Tensor],
    way: str = "forward",
) -> tuple[list[Tensor], float]:
    """One batch's generalised Gauss-Newton product ``J^T (d^2 S_b / do^2) J V`` and its count.

    :func:`output_curvature_batch_product` with the loss's output Hessian
    (:meth:`~curvkit.losses.BatchLoss.output_hessian_product`).

    Example:
        For a linear model and the squared error, ``J^T H J = 2 X^T X``:

        >>> import curvkit
        >>> X, y = torch.tensor([[1.0, 0.0], [1.0, 2.0]]), torch.zeros(2, 1)
        >>> problem = curvkit.Problem(torch.nn.Linear(2, 1, bias=False), "mse", (X, y))
        >>> V = [torch.eye(2).reshape(2, 1, 2)]  # K = 2 directions of the [1, 2] weight
        >>> parts, count = ggn_batch_product(problem, problem.params, X, y, V)
        >>> parts[0][:, 0], count
        (tensor([[4., 4.],
                [4., 8.]]), 2.0)
    """
    loss = problem.loss

    def hessian(outputs: Tensor, U: Tensor) -> Tensor:
        return loss.output_hessian_product(outputs, targets, U)

    return output_curvature_batch_product(problem, params, inputs, targets, V, hessian, way)


# ---------------------------------------------------------- per sample
def per_sample_vjp(
    problem: Problem,
    params: Sequence[Tensor],
    inputs: Any,
    cotangents: Tensor,
    vectorize: bool = True,
    forward: Callable[[Sequence[Tensor], Any], Tensor] | None = None,
) -> list[Tensor]:
    """``J_n^T u_{nq}`` for every sample ``n`` and each of its ``Q`` cotangents.

    ``J_n`` is the Jacobian of the model applied to sample ``n`` alone (a batch
    of one), w.r.t. the parameters.

    Args:
        problem: Provides the model call.
        params: The selected parameters (detached).
        inputs: The batch's inputs (samples along dim 0).
        cotangents: ``[N, Q, *o.shape[1:]]``: for each sample, ``Q`` cotangents of
            its outputs.
        vectorize: :func:`torch.func.vmap` over the samples and cotangents
            (``True``), or a loop with plain autograd (``False``: models that
            ``vmap`` cannot batch, e.g. in-place writes into a buffer).
        forward: ``(params, inputs) -> outputs`` (default ``problem.forward``;
            another selection of parameters, the others fixed, say).

    Returns:
        Per parameter, the ``[N, Q, *shape]`` products.
    """
    params = tuple(p.detach() for p in params)
    forward = forward or problem.forward
    if vectorize:

        def one(x: Any, u: Tensor) -> tuple[Tensor, ...]:
            _, pullback = vjp(lambda *ps: forward(ps, _one_sample(x))[0], *params)
            return vmap(pullback)(u)

        return list(vmap(one)(inputs, cotangents))
    N, Q = cotangents.shape[:2]
    leaves = [p.detach().requires_grad_(True) for p in params]
    out = [leaf.new_zeros(N, Q, *leaf.shape) for leaf in leaves]
    with torch.enable_grad():
        for n in range(N):
            outputs = forward(leaves, _sample(inputs, n))[0]
            for i, products in enumerate(output_vjp(outputs, leaves, cotangents[n])):
                out[i][n] = products
    return out


def per_sample_gradients(
    problem: Problem, params: Sequence[Tensor], inputs: Any, targets: Tensor, vectorize: bool = True
) -> tuple[list[Tensor], Tensor, float]:
    """Per-sample gradients ``g_n = d s_n / dtheta`` of a batch, its outputs and its count.

    ``s_n`` is the sum of sample ``n``'s loss terms (all its positions or
    entries, weighted as the loss weighs them, ignored ones left out), so that
    ``sum_n g_n`` is the gradient of ``S_b``. Computed as ``J_n^T (dS_b/do)_n``
    (see the module docstring).

    Returns:
        Per parameter, the ``[N, *shape]`` gradients; the batch's (detached)
        outputs; the batch's count ``c_b``.
    """
    with torch.no_grad():
        outputs = problem.forward([p.detach() for p in params], inputs)
    gradient = output_gradient(problem.loss, outputs, targets)
    grads = per_sample_vjp(problem, params, inputs, gradient.unsqueeze(1), vectorize)
    return [g.squeeze(1) for g in grads], outputs, problem.loss.count(outputs, targets)


# ----------------------------------------------------------------- diagonal
def _positionwise(column: Tensor) -> Tensor:
    """``[N, D, C, *pos]``: one factor column ``[N, C, *pos]`` split into one cotangent per position.

    Cotangent ``d`` of sample ``n`` is ``column[n, :, pos_d]`` at position ``pos_d``
    and zero elsewhere; outputs of fewer than two dims give ``[N, 1]``.
    """
    if column.ndim < 2:
        return column.reshape(column.shape[0], 1)
    N, C, pos = column.shape[0], column.shape[1], column.shape[2:]
    D = pos.numel()
    embedded = torch.diag_embed(column.reshape(N, C, D))  # [N, C, D, D]
    return embedded.permute(0, 2, 1, 3).reshape(N, D, C, *pos)


def sum_of_squared_pullbacks(
    problem: Problem,
    params: Sequence[Tensor],
    inputs: Any,
    cotangents_of: Callable[[Tensor], Tensor],
    layers: LayerDiagonals | None = None,
    vectorize: bool = True,
) -> tuple[list[Tensor], Tensor]:
    """``sum_{n,q} (J_n^T u_{nq})^2`` per parameter: the squared per-sample pullbacks, summed.

    Parameters that a layer rule covers (:class:`curvkit.layers.LayerDiagonals`)
    take it: one forward pass and a backward pass per cotangent column, no
    per-sample parameter gradients. The others take :func:`per_sample_vjp`, in
    chunks of cotangent columns that keep its ``N x Q x P`` products within
    :data:`PULLBACK_CHUNK_BYTES`.

    Args:
        problem: Provides the model call.
        params: The selected parameters.
        inputs: The batch's inputs.
        cotangents_of: ``outputs -> [N, Q, *o.shape[1:]]``: ``Q`` cotangents of
            each sample's outputs, given the batch's (detached) outputs.
        layers: The operator's layer rules (``None``: none, all generic).
        vectorize: ``vmap`` in the generic path (see :func:`per_sample_vjp`).

    Returns:
        Per parameter, a tensor of its shape; the batch's (detached) outputs.
    """
    params = [p.detach() for p in params]
    if layers is None:
        with torch.no_grad():
            outputs = problem.forward(params, inputs)
        ruled, cotangents = {}, cotangents_of(outputs)
    else:
        ruled, outputs, cotangents = layers(params, inputs, cotangents_of)
    out: list[Tensor | None] = [ruled.get(i) for i in range(len(params))]
    rest = [i for i, o in enumerate(out) if o is None]
    if rest:

        def forward(ps: Sequence[Tensor], x: Any) -> Tensor:
            full = list(params)
            for i, p in zip(rest, ps):
                full[i] = p
            return problem.forward(full, x)

        sub = [params[i] for i in rest]
        sums = [torch.zeros_like(p) for p in sub]
        per_column = cotangents.shape[0] * sum(p.numel() for p in sub) * sub[0].element_size()
        chunk = max(1, PULLBACK_CHUNK_BYTES // max(per_column, 1))
        for start in range(0, cotangents.shape[1], chunk):
            columns = cotangents[:, start : start + chunk]
            parts = per_sample_vjp(problem, sub, inputs, columns, vectorize, forward)
            sums = [s + part.square().sum(dim=(0, 1)) for s, part in zip(sums, parts)]
        for i, total in zip(rest, sums):
            out[i] = total
    return out, outputs


def factor_cotangents(factor: Tensor) -> Tensor:
    """``[N, R D, *o.shape[1:]]``: a block-diagonal factor's columns as per-sample cotangents.

    Column ``r`` of a factor ``[*o.shape, R]`` in the layout of ``BLOCK_DIAGONAL``
    losses is split by position (``D`` per sample), so that ``sum_q`` of the
    cotangents' outer products is ``F F^T`` block by block.
    """
    return torch.cat([_positionwise(factor[..., r]) for r in range(factor.shape[-1])], dim=1)


def monte_carlo_factor(
    loss: BatchLoss, outputs: Tensor, targets: Tensor, generator: torch.Generator | None, samples: int
) -> Tensor:
    """``Phi = [g_1, ..., g_S] / sqrt(S)``: output gradients at ``S`` targets drawn from the model.

    ``g_s = dS_b(o, y_s) / do`` with ``y_s ~ p(y | o)``
    (:meth:`~curvkit.losses.BatchLoss.sample_targets`), in the generator's order,
    so that ``E[Phi Phi^T]`` is the exact Fisher factor product in the loss's layout.
    """
    gradients = [
        output_gradient(loss, outputs, loss.sample_targets(outputs, targets, generator))
        for _ in range(samples)
    ]
    return torch.stack(gradients, dim=-1) / samples**0.5


def factor_batch_diagonal(
    problem: Problem,
    params: Sequence[Tensor],
    inputs: Any,
    targets: Tensor,
    factor: Callable[[Tensor], Tensor],
    block_diagonal: bool,
    vectorize: bool = True,
    layers: LayerDiagonals | None = None,
) -> tuple[list[Tensor], float]:
    """One batch's ``diag(J^T F F^T J)`` and its count, for the factor ``F = factor(outputs)``.

    ``diag(J^T F F^T J) = sum_r (J^T F[..., r])^2`` entry by entry. With a
    block-diagonal factor (``BLOCK_DIAGONAL`` of the loss) each column is split
    by sample and position, each part pulled back through that sample's
    Jacobian: :func:`sum_of_squared_pullbacks` over ``R D`` cotangents per sample
    (``D`` positions per sample), by layer rules where ``layers`` has them.
    Otherwise each column is one cotangent of the whole batch.

    Returns:
        Per parameter, the batch's diagonal terms (of the parameter's shape), and
        the batch's count.
    """
    params = tuple(p.detach() for p in params)
    if block_diagonal:

        def cotangents_of(outputs: Tensor) -> Tensor:
            return factor_cotangents(factor(outputs))

        diagonal, outputs = sum_of_squared_pullbacks(
            problem, params, inputs, cotangents_of, layers, vectorize
        )
        return diagonal, problem.loss.count(outputs, targets)
    diagonal = [torch.zeros_like(p) for p in params]
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        outputs = problem.forward(leaves, inputs)
        columns = factor(outputs.detach()).movedim(-1, 0)  # [R, *o.shape]
        for start in range(0, columns.shape[0], _VJP_CHUNK):
            parts = output_vjp(outputs, leaves, columns[start : start + _VJP_CHUNK])
            diagonal = [d + part.square().sum(dim=0) for d, part in zip(diagonal, parts)]
    return diagonal, problem.loss.count(outputs.detach(), targets)
