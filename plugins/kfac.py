"""KFAC and EKFAC (``kfac``, ``ekfac``): Kronecker-factored curvature from layer inputs and output gradients.

For a layer whose per-sample weight gradient is ``G_n A_n^T`` (the rows form of
:mod:`curvkit.layers`: inputs ``a_nl`` and output gradients ``b_nql`` at positions
``l``, for ``q`` over the cotangents of sample ``n``), the Gauss-Newton block
``(1/C) sum_{n,q} vec(G_nq A_n^T) vec(G_nq A_n^T)^T`` is approximated, per group,
by ``B (x) A`` (J. Martens and R. Grosse, "Optimizing neural networks with
Kronecker-factored approximate curvature", ICML 2015; R. Grosse and J. Martens,
"A Kronecker-factored approximate Fisher matrix for convolution layers", ICML
2016) with

* ``approx="expand"`` (default; every position a datum, F. Eschenhagen, A.
  Immer, R. Turner, F. Schneider and P. Hennig, "Kronecker-factored approximate
  curvature for modern neural network architectures", NeurIPS 2023):
  ``A = 1/(N L) sum_{n,l} a_nl a_nl^T`` and ``B = (1/C) sum_{n,q,l} b_nql b_nql^T``;
* ``approx="reduce"`` (positions summed first): ``A = 1/(N L^2) sum_n (sum_l a_nl)
  (sum_l a_nl)^T`` and ``B = (1/C) sum_{n,q} (sum_l b_nql)(sum_l b_nql)^T``.

**Scaling convention.** ``A`` is a mean over the ``N`` samples (and ``L``
positions), ``B`` carries the loss's normalisation ``1/C`` (``C`` the loss's count:
``N`` for a mean over samples, 1 for ``reduction="sum"``), the same
normalisation as every curvkit curvature. So KFAC *equals* the GGN block where
it is exact: for one datum, and for a deep linear network with the squared
error and ``fisher_type="type-2"`` (where ``B_n`` is the same for every sample);
both are tested to 1e-10. Libraries differ: curvlinops' factors are twice
BackPACK's and ASDL's for the squared error (curvlinops issue 82), and BackPACK
scales convolution factors by the number of spatial positions differently
(Grosse and Martens' ``1/|T|`` sits on ``B`` there, on ``A`` here: the product
is the same, each factor is not).

``fisher_type`` says where the cotangents ``u_nq`` come from (``b = J_z^T u``):

* ``"type-2"`` (default): the columns of the loss's output-Hessian square root
  (``loss.output_hessian_factor``), per sample and position: the GGN;
* ``"mc"``: ``mc_samples`` output gradients at targets drawn from the model
  (seeded like the ``fisher`` estimator): the Monte-Carlo Fisher;
* ``"empirical"``: the output gradient at the data's targets, one per sample:
  the empirical Fisher;
* ``"forward-only"``: no backward pass, ``B = I``: the input factor alone.

The bias is folded into the input factor (a column of ones, ``fold_bias=True``)
or gets its own block ``B (x) [1]``. Blocks exist for every layer type with a
rule in :data:`curvkit.layers.LAYER_RULES` (``Linear``, ``Conv2d`` with zero
padding, eval-mode ``BatchNorm``, ``LayerNorm``) or registered by a plugin through
the ``curvkit_kfac_layer_rules`` hook this plugin declares. A selected parameter
of a module without a block follows ``unsupported``: ``"error"`` (default; the
message names the modules and the ways out), ``"warn"`` or ``"skip"`` (the
operator is zero on it). The factors' total size is known before any data pass
and refused above ``max_factor_bytes`` (default 2 GiB, or
``CURVKIT_KFAC_MAX_BYTES``), the per-layer sizes in the message.

**EKFAC** (T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, "Fast
approximate natural gradient descent in a Kronecker-factored eigenbasis",
NeurIPS 2018) keeps KFAC's eigenbasis ``Q = Q_B (x) Q_A`` and replaces its
eigenvalues by the Frobenius-optimal diagonal in that basis,
``s = diag(Q^T M Q) = (1/C) sum_{n,q} (Q^T g_nq)^2`` for the per-sample, per-cotangent
gradients ``g_nq`` whose outer products ``M`` sums (for ``type-2``: the GGN
block), from a second pass over the data. ``Q^T g`` is the per-sample gradient of
the rotated rows ``(Q_B^T G)(Q_A^T A)^T``, so the pass forms no parameter-sized
per-sample gradients.

Both are :class:`curvkit.KroneckerOperator` s once the factors are in: products,
diagonal, trace, inverse, log-determinant and eigenpairs exact from the factors
(``curvkit.eigenvalues`` and ``curvkit.trace`` use them, no Lanczos or
Hutchinson), ``damped(gamma, kind="identity" | "factored" | "pi")``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import curvkit
from curvkit.jacobians import factor_cotangents, monte_carlo_factor, output_gradient
from curvkit.layers import (
    LAYER_RULES,
    LayerBatch,
    LayerCapture,
    LayerRule,
    contract_rows,
    squared_gradient_sums,
)
from curvkit.remedies import option, setting

_PARAMS = setting("params", "NAMES", python="NAMES")
"""How the messages name the parameter selection, on the command line and in Python."""

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
APPROXIMATIONS = ("expand", "reduce")
UNSUPPORTED = ("error", "warn", "skip")
DEFAULT_MAX_FACTOR_BYTES = 2 * 2**30


# ----------------------------------------------------------------- the layer-rule hook
@dataclass
class KFACLayerRule:
    """A layer type's rule, registered by a plugin through ``curvkit_kfac_layer_rules``.

    Attributes:
        name: Unique name of the rule (for messages and duplicates).
        module_type: The module class it covers (exact type).
        rule: The :class:`curvkit.layers.LayerRule`: when it applies, the layer's
            inputs and output gradients in the rows form, and its factor shape.
        plugin: Set by the registry.
    """

    name: str
    module_type: type[nn.Module]
    rule: LayerRule
    plugin: str | None = None


class KFACHooks:
    """Hook specifications this plugin declares (added through ``curvkit_add_hookspecs``)."""

    @curvkit.hookspec
    def curvkit_kfac_layer_rules() -> list[KFACLayerRule]:
        """Add layer types to the ``kfac`` and ``ekfac`` estimators.

        A rule's ``inputs(module, a)`` and ``grads(module, g, A)`` give the layer's
        inputs ``A`` ``[N, groups, k, L]`` and output gradients ``G``
        ``[N, Q, groups, o, L]`` such that the per-sample gradient of its weight (reshaped to
        ``[groups, o, k]``) is ``G_n A_n^T`` and of its bias (``[groups * o]``)
        ``G_n 1``; the first batch checks that these sum to autograd's gradient and
        refuses the layer otherwise. A rule for a type that has a built-in one
        replaces it. See ``docs/kfac.md``.

        Returns:
            A list of :class:`KFACLayerRule`.
        """


@curvkit.hookimpl
def curvkit_add_hookspecs(pluginmanager: Any) -> None:
    pluginmanager.add_hookspecs(KFACHooks)
    curvkit.registry.add_item_kind(
        "kfac_layer_rules",
        curvkit.registry.ItemKind("curvkit_kfac_layer_rules", KFACLayerRule, "KFAC layer rule"),
    )


def kfac_layer_rules() -> dict[type[nn.Module], LayerRule]:
    """The built-in rules and those plugins register (a plugin's replaces a built-in)."""
    rules = dict(LAYER_RULES)
    for item in curvkit.registry.items("kfac_layer_rules").values():
        rules[item.module_type] = item.rule
    return rules


def default_max_factor_bytes() -> int:
    """The default budget for the factors: 2 GiB, or ``CURVKIT_KFAC_MAX_BYTES``."""
    return int(os.environ.get("CURVKIT_KFAC_MAX_BYTES", str(DEFAULT_MAX_FACTOR_BYTES)))


# ----------------------------------------------------------------- the estimator
class KFACOperator(curvkit.ProblemOperator):
    """KFAC of the GGN, the Fisher or the empirical Fisher, as a structured operator.

    Args:
        problem: The problem.
        fisher_type: ``"type-2"`` (default), ``"mc"``, ``"empirical"`` or
            ``"forward-only"`` (see the module docstring).
        mc_samples: Targets drawn per sample for ``"mc"``.
        seed: Seed of the draws for ``"mc"`` (``None``: one drawn at construction).
        approx: ``"expand"`` (default) or ``"reduce"`` for layers applied at several
            positions (sequences, convolutions).
        fold_bias: Fold the bias into the input factor (default) or give it its
            own block.
        unsupported: ``"error"`` (default), ``"warn"`` or ``"skip"`` for selected
            parameters of modules without a block.
        max_factor_bytes: Refuse factors larger than this in total (default
            :func:`default_max_factor_bytes`).

    Raises:
        CurvkitError: An unknown option value, a loss without per-sample output
            Hessian blocks for ``"type-2"``/``"mc"``, or factors above the budget.
        UnsupportedModelError: Selected parameters of modules without a block,
            under ``unsupported="error"``.
        NotNegativeLogLikelihoodError: ``"mc"`` with a loss that is not one.

    Example:
        For one datum KFAC is the GGN block exactly:

        >>> import torch
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
        >>> problem = curvkit.Problem(model, "cross_entropy", (X, y))
        >>> K = curvkit.curvature("kfac", problem).restrict("2")
        >>> G = curvkit.curvature("ggn", problem).restrict("2")
        >>> bool(torch.allclose(K.to_dense(), G.to_dense(), atol=1e-12))
        True
    """

    SYMMETRIC, PSD, EXACT, STOCHASTIC = True, True, False, False
    CHEAP_DIAGONAL = True
    STRUCTURE = frozenset(curvkit.operator.STRUCTURE_METHODS)
    ESTIMATOR = "kfac"
    """The name it is registered under, for the remedies its messages name (``--option kfac.NAME=...``)."""

    def __init__(
        self,
        problem: curvkit.Problem,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        seed: int | None = None,
        approx: str = "expand",
        fold_bias: bool = True,
        unsupported: str = "error",
        max_factor_bytes: int | None = None,
    ):
        _choose("fisher_type", fisher_type, FISHER_TYPES)
        _choose("approx", approx, APPROXIMATIONS)
        _choose("unsupported", unsupported, UNSUPPORTED)
        mc_samples = curvkit.arguments.integer(mc_samples, "mc_samples")
        loss = problem.loss
        if fisher_type in ("type-2", "mc") and not loss.BLOCK_DIAGONAL:
            raise curvkit.CurvkitError(
                f"KFAC with fisher_type={fisher_type!r} needs a loss whose output Hessian is block-diagonal "
                f"per sample; loss {loss.name!r} is known only as a callable: use fisher_type='empirical' "
                "or a built-in loss"
            )
        if fisher_type == "mc" and not loss.is_negative_log_likelihood:
            raise curvkit.NotNegativeLogLikelihoodError(
                f"KFAC with fisher_type='mc' draws targets from the model, but loss {loss.name!r} is not a "
                "negative log-likelihood: use fisher_type='type-2' or 'empirical'"
            )
        self.STOCHASTIC = fisher_type == "mc"
        super().__init__(problem, seed=seed)
        self.fisher_type, self.mc_samples, self.approx = fisher_type, mc_samples, approx
        self.fold_bias, self.unsupported = fold_bias, unsupported
        self.capture = LayerCapture(problem, kfac_layer_rules())
        self.budget = default_max_factor_bytes() if max_factor_bytes is None else max_factor_bytes
        self._kronecker: curvkit.KroneckerOperator | None = None
        self._snapshot: curvkit.ModelSnapshot | None = None
        with problem.evaluation():
            candidates = self.capture.candidates()
        self._refuse_unsupported(candidates, before_data=True)
        self._check_memory(candidates)

    # ---------------------------------------------------------------- set-up checks
    def _refuse_unsupported(self, covered: dict, before_data: bool) -> None:
        """Apply the ``unsupported`` policy to selected parameters no block covers.

        Before the data pass: parameters of modules without a rule. After the
        first batch: those of layers with a rule that the batch ruled out (run
        more than once, or a weight also used elsewhere), reported once.
        """
        covered_index = {i for _, names in covered.values() for i in names.values()}
        missing = [n for i, n in enumerate(self.problem.param_names) if i not in covered_index]
        if before_data:
            self._missing_before_data = set(missing)
        else:
            missing = [n for n in missing if n not in self._missing_before_data]
        if not missing:
            return
        modules = sorted({n.rsplit(".", 1)[0] if "." in n else "(top level)" for n in missing})
        types = {}
        named = dict(self.problem.model.named_modules())
        for m in modules:
            module = named.get(m)
            types[m] = type(module).__name__ if module is not None else "parameter"
        listing = ", ".join(f"{m} ({types[m]})" for m in modules)
        why = (
            "no KFAC block for"
            if before_data
            else "their layers ran more than once per forward pass, or their weights are also used "
            "outside them, in"
        )
        skip, warn = (option(self.ESTIMATOR, "unsupported", policy) for policy in ("skip", "warn"))
        message = (
            f"{why} {listing}: parameters {missing[:6]}{' ...' if len(missing) > 6 else ''}. Skip them "
            f"(the operator is zero there) with {skip}, or with a warning with {warn}; restrict the "
            f"parameters with {_PARAMS}; or add a block with the "
            "curvkit_kfac_layer_rules hook"
        )
        if self.unsupported == "error":
            raise curvkit.UnsupportedModelError(message)
        if self.unsupported == "warn":
            warnings.warn(message, curvkit.CurvkitWarning, stacklevel=3)

    def factor_sizes(self, layers: dict) -> dict[str, int]:
        """Bytes of each layer's factors (``A`` and ``B`` of every group, at the problem's precision)."""
        itemsize = torch.finfo(self.problem.dtype).bits // 8
        sizes = {}
        for key, (module, names) in layers.items():
            groups, o, k = self.capture.rules[type(module)].shape(module)
            widths = _block_widths(names, k, self.fold_bias)
            sizes[key] = itemsize * groups * (sum(w * w for w in widths) + o * o)
        return sizes

    def _check_memory(self, layers: dict) -> None:
        sizes = self.factor_sizes(layers)
        total = sum(sizes.values())
        if total > self.budget:
            largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
            listing = ", ".join(f"{k}: {_gib(v)}" for k, v in largest)
            raise curvkit.CurvkitError(
                f"the KFAC factors would take {_gib(total)}, above the budget of {_gib(self.budget)} "
                f"(largest: {listing}); restrict the parameters with {_PARAMS}, raise the budget with "
                f"{option(self.ESTIMATOR, 'max_factor_bytes', total)}, or set CURVKIT_KFAC_MAX_BYTES"
            )

    # ---------------------------------------------------------------- factors
    def cotangents(self, outputs: Tensor, targets: Tensor, generator: torch.Generator | None) -> Tensor:
        """``[N, Q, *o.shape[1:]]``: the cotangents of ``fisher_type`` for a batch's outputs."""
        loss = self.problem.loss
        if self.fisher_type == "type-2":
            return factor_cotangents(loss.output_hessian_factor(outputs, targets))
        if self.fisher_type == "mc":
            return factor_cotangents(monte_carlo_factor(loss, outputs, targets, generator, self.mc_samples))
        if self.fisher_type == "empirical":
            return output_gradient(loss, outputs, targets).unsqueeze(1)
        return outputs.new_zeros(outputs.shape[0], 0, *outputs.shape[1:])

    def _members(self, names: dict[str, int]) -> list[tuple[bool, bool]]:
        """Whether each of a layer's blocks holds its weight, its bias."""
        return [(w is not None, b is not None) for w, b in _block_members(names, self.fold_bias)]

    def _input_rows(self, batch: LayerBatch, key: str) -> list[Tensor]:
        """The inputs of each of a layer's blocks, ``[N, groups, k, L]`` (a column of ones for a bias)."""
        names = batch.layers[key][1]
        A = batch.input_rows(key)
        ones = A.new_ones(A.shape[0], A.shape[1], 1, A.shape[3])
        if "weight" not in names:
            return [ones]
        if "bias" not in names:
            return [A]
        return [torch.cat([A, ones], dim=2)] if self.fold_bias else [A, ones]

    def _factor_pass(self, params: list[Tensor], generator: torch.Generator | None) -> dict[str, Any]:
        """One pass: per layer, the summed input factors, output factor and point counts."""
        reduce = self.approx == "reduce"

        def per_batch(inputs: Any, targets: Tensor) -> tuple[list, float]:
            sums: dict[str, list] = {}
            with self.capture.forward(
                params, inputs, lambda o: self.cotangents(o, targets, generator)
            ) as batch:
                for key in batch.layers:
                    A = batch.input_rows(key)
                    if reduce:  # the positions' mean: one row per sample
                        A = A.mean(-1, keepdim=True)
                    names = batch.layers[key][1]
                    factors = [_input_factor(A, weight, bias) for weight, bias in self._members(names)]
                    sums[key] = [factors, None, A.new_tensor(float(A.shape[0] * A.shape[3]))]
                for key, _, _, _, G in batch.rows():
                    part = _outer_sum(G.sum(-1, keepdim=True) if reduce else G)
                    sums[key][1] = part if sums[key][1] is None else sums[key][1] + part
                count = self.problem.loss.count(batch.outputs.detach(), targets)
            keys = sorted(sums)
            return [sums[k] for k in keys], count

        total, count = self.problem.batch_sums(per_batch)
        keys = sorted(self.capture.covered or {})
        reduced = self.problem.full_data(total, count) if total is not None else []
        return dict(zip(keys, reduced))

    def structured(self) -> curvkit.KroneckerOperator:
        """The Kronecker-factored operator (:meth:`kronecker`), what holds this operator's structure."""
        return self.kronecker()

    def kronecker(self) -> curvkit.KroneckerOperator:
        """The Kronecker-factored operator of the current model state (factors computed once per state)."""
        snapshot = self.problem.current_snapshot()
        if self._kronecker is None or self._snapshot is not snapshot:
            self.problem.ensure_deterministic(snapshot)
            self._kronecker = self._build(snapshot)
            self._snapshot = snapshot
        return self._kronecker

    def _build(self, snapshot: curvkit.ModelSnapshot) -> curvkit.KroneckerOperator:
        params = [p.detach() for p in self.problem.params]
        self.data_passes += 1
        sums = self._factor_pass(params, self.product_generator())
        covered = self.capture.covered or {}
        self._refuse_unsupported(covered, before_data=False)
        blocks = []
        for key, (module, names) in covered.items():
            factors, B, points = sums[key]
            if B is None:  # forward-only: no output gradients, B = I
                groups, o, _ = self.capture.rules[type(module)].shape(module)
                B = torch.eye(o, dtype=self.dtype, device=self.device).expand(groups, o, o)
            layouts = _block_members(names, self.fold_bias)
            for (weight, bias), A in zip(layouts, factors):
                blocks.append(
                    curvkit.KroneckerBlock(weight=weight, bias=bias, A=A / points, B=B.clone(), name=key)
                )
        self._blocks_built(blocks, params)
        return curvkit.KroneckerOperator(self.layout, blocks, dtype=self.dtype, device=self.device)

    def _blocks_built(self, blocks: list[curvkit.KroneckerBlock], params: list[Tensor]) -> None:
        """A hook for EKFAC: called with the KFAC blocks before the operator is made."""

    # ---------------------------------------------------------------- structure
    def _product(self, M: Tensor, snapshot: curvkit.ModelSnapshot) -> Tensor:
        return self.kronecker().matmat(M)

    def _diagonal(self) -> Tensor:
        return self.kronecker().diagonal()

    def _trace(self) -> float:
        return self.kronecker().trace()

    def _inverse(self, damping: float) -> curvkit.CurvatureOperator:
        return self.kronecker().inverse(damping)

    def _logdet(self, damping: float) -> float:
        return self.kronecker().logdet(damping)

    def _eigenpairs(self, k: int, which: str) -> tuple[Tensor, Tensor]:
        return self.kronecker()._eigenpairs(k, which)

    def damped(self, damping: float, kind: str = "identity") -> curvkit.CurvatureOperator:
        """``A + damping I`` (``kind="identity"``) or factored damping (``"factored"``, ``"pi"``).

        See :meth:`curvkit.KroneckerOperator.damped`; the factored kinds return the
        Kronecker operator of the current model state.
        """
        if kind == "identity":
            return super().damped(damping)
        return self.kronecker().damped(damping, kind=kind)

    def restrict(self, params: str | Sequence[str]) -> curvkit.CurvatureOperator:
        """The blocks of the parameters named, from the factors already computed."""
        return self.kronecker().restrict(params)


class EKFACOperator(KFACOperator):
    """EKFAC: KFAC's eigenbasis with the Frobenius-optimal eigenvalues (a second pass over the data).

    Takes the options of :class:`KFACOperator`, whose signature it shows, so that an
    unknown one is refused by name and ``curvkit analyze --seed`` reaches ``seed``
    (``fisher_type="forward-only"`` has no gradients to correct with and is refused).
    """

    ESTIMATOR = "ekfac"

    def __init__(self, problem: curvkit.Problem, **options: Any):
        if options.get("fisher_type") == "forward-only":
            raise curvkit.CurvkitError(
                "EKFAC corrects KFAC's eigenvalues with gradients, and fisher_type='forward-only' has none: "
                "use 'type-2', 'mc' or 'empirical'"
            )
        super().__init__(problem, **options)

    # KFAC's options by name (one list, KFACOperator's): what the registry's option check and
    # curvkit analyze's --seed read, so an unknown option is refused before construction
    __init__.__signature__ = inspect.signature(KFACOperator.__init__)  # type: ignore[attr-defined]

    def _blocks_built(self, blocks: list[curvkit.KroneckerBlock], params: list[Tensor]) -> None:
        generator = self.product_generator()
        by_layer: dict[str, list[curvkit.KroneckerBlock]] = {}
        for block in blocks:
            by_layer.setdefault(block.name, []).append(block)

        def per_batch(inputs: Any, targets: Tensor) -> tuple[list, float]:
            sums: dict[str, list] = {}
            with self.capture.forward(
                params, inputs, lambda o: self.cotangents(o, targets, generator)
            ) as batch:
                rows_of = {key: self._input_rows(batch, key) for key in batch.layers}
                for key, _, _, _, G in batch.rows():
                    parts = []
                    for block, A in zip(by_layer[key], rows_of[key]):
                        _, QA, _, QB = block.eig()
                        QA, QB = QA.to(A.dtype), QB.to(G.dtype)
                        rotated_A = torch.einsum("gkj,ngkl->ngjl", QA, A)  # Q_A^T a
                        rotated_G = torch.einsum("gop,nqgol->nqgpl", QB, G)  # Q_B^T b
                        parts.append(squared_gradient_sums(rotated_A, rotated_G)["weight"])
                    sums[key] = parts if key not in sums else [s + p for s, p in zip(sums[key], parts)]
                count = self.problem.loss.count(batch.outputs.detach(), targets)
            return [sums[k] for k in sorted(sums)], count

        self.data_passes += 1
        total, count = self.problem.batch_sums(per_batch)
        scalings = dict(zip(sorted(by_layer), self.problem.full_data(total, count)))
        for key, layer_blocks in by_layer.items():
            for block, s in zip(layer_blocks, scalings.get(key, [])):
                block.scalings = s


def layerwise_ggn(problem: curvkit.Problem) -> Tensor:
    """The dense GGN with every entry between two layers' parameters zeroed: what KFAC approximates.

    KFAC and EKFAC equal it (with ``fold_bias=True``) for one datum and for deep
    linear networks under the squared error (the conformance battery's
    ``reference_on``). Parameters are grouped by the module that owns them.
    """
    from curvkit.testing import dense_ggn_reference

    dense = dense_ggn_reference(problem)
    owners = [name.rsplit(".", 1)[0] if "." in name else "" for name in problem.layout.names]
    index = {owner: i for i, owner in enumerate(dict.fromkeys(owners))}
    labels = torch.cat(
        [torch.full((n,), index[o], dtype=torch.long) for o, n in zip(owners, problem.layout.numels)]
    ).to(dense.device)
    return dense * (labels[:, None] == labels[None, :])


def _input_factor(A: Tensor, weight: bool, bias: bool) -> Tensor:
    """A block's summed input factor from the rows ``A`` ``[N, groups, k, L]``.

    With a folded bias the rows carry a one more, so the factor is
    ``[[sum R R^T, sum R], [sum R^T, N L]]``, assembled without copying the rows.
    """
    N, groups, _, L = A.shape
    count = A.new_full((groups, 1, 1), float(N * L))
    if not weight:
        return count
    products = _outer_sum(A)
    if not bias:
        return products
    column = A.sum((0, 3)).unsqueeze(-1)  # [groups, k, 1]
    top = torch.cat([products, column], dim=2)
    bottom = torch.cat([column.transpose(1, 2), count], dim=2)
    return torch.cat([top, bottom], dim=1)


def _outer_sum(rows: Tensor) -> Tensor:
    """``sum`` over the leading dims of ``R R^T`` for ``rows`` ``[..., groups, m, L]``: ``[groups, m, m]``."""
    return contract_rows(rows, rows)


def _choose(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise curvkit.CurvkitError(f"unknown {option} {value!r}; use one of {', '.join(choices)}")


def _block_members(names: dict[str, int], fold_bias: bool) -> list[tuple[int | None, int | None]]:
    """``(weight, bias)`` parameter indices of each of a layer's blocks."""
    weight, bias = names.get("weight"), names.get("bias")
    if weight is None or bias is None or fold_bias:
        return [(weight, bias)]
    return [(weight, None), (None, bias)]


def _block_widths(names: dict[str, int], k: int, fold_bias: bool) -> list[int]:
    """The input-factor width of each of a layer's blocks."""
    return [
        (k if weight is not None else 0) + (1 if bias is not None else 0)
        for weight, bias in _block_members(names, fold_bias)
    ]


def _gib(n: float) -> str:
    """A size in bytes, readable."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


@curvkit.hookimpl
def curvkit_register_estimators() -> list[curvkit.EstimatorSpec]:
    return [
        curvkit.EstimatorSpec(
            name="kfac",
            factory=KFACOperator,
            description="KFAC: Kronecker-factored GGN/Fisher blocks (Linear, Conv2d, norms); exact inverse, "
            "eigenvalues and trace from the factors.",
            reference=layerwise_ggn,
            reference_on=("single-datum", "deep-linear"),
        ),
        curvkit.EstimatorSpec(
            name="ekfac",
            factory=EKFACOperator,
            description="EKFAC: KFAC's eigenbasis with eigenvalues corrected from per-sample gradients.",
            reference=layerwise_ggn,
            reference_on=("single-datum", "deep-linear"),
        ),
    ]
