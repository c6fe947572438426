"""The anisotropic Nesterov cubic-regularised step of the Newton summary, solved exactly.

P. Wolinski ("Adapting Newton's Method to Neural Networks through a Summary of
Higher-Order Derivatives", arXiv 2312.03885, 2023) steps
``theta <- theta - sum_s eta_s v_s`` over a partition into ``S`` subsets, with
``g_bar`` ``[S]``, ``H_bar`` ``[S, S]`` (symmetric, possibly indefinite) and
``D = diag(d)``, ``d_s = |D3_s|^(1/3) >= 0`` (:mod:`curvkit.newton_summary`). The
learning rates ``eta`` minimise the cubic model of the loss decrease

.. math::

    m(\\eta) = -\\bar g^T \\eta + \\tfrac12 \\eta^T \\bar H \\eta
               + \\tfrac{\\lambda_{int}}{6} \\|D \\eta\\|^3 ,

whose stationary points solve
``eta = (H_bar + (lambda_int / 2) ||D eta|| D^2)^-1 g_bar``; the paper takes
the solution of largest ``||D eta||``, which is the global minimiser of ``m``
when ``m`` is bounded below. Without regularisation (``lambda_int = 0``) this is
the Newton step ``eta = H_bar^-1 g_bar``.

The solve (:func:`cubic_step`), in float64:

0. **Scaling.** The model only sees ``lambda_int d_s^3`` and is invariant under
   ``eta_s -> eta_s / alpha_s``, ``g_bar -> A g_bar``, ``H_bar -> A H_bar A``,
   ``d -> A d`` (rescaling the directions ``v_s``): ``d`` is divided by ``max(d)``
   (``lambda_int`` times ``max(d)^3``), then the problem is balanced, ``e = s eta``
   with ``s_s = d_s`` on the regularised subsets and ``sqrt|H_ss|`` (or 1) on the
   others, so that summaries whose subsets differ by orders of magnitude give the
   same step and every tolerance below is relative to the subsets' own scale.
1. **Unregularised subsets.** The cubic term does not see the subsets ``Z`` with
   ``d_s = 0`` (all of them when ``lambda_int = 0``). For fixed ``eta_P`` on the
   others, ``m`` is a quadratic in ``eta_Z``, minimised by
   ``eta_Z = H_ZZ^+ (g_Z - H_ZP eta_P)`` when ``H_ZZ`` is positive
   semi-definite and ``m`` does not decrease linearly along its null space
   (``g_Z`` and ``H_PZ`` orthogonal to it: a *flat* direction, on which ``eta``
   is set to zero, the minimum-norm minimiser). Substituting leaves the Schur
   complement ``H_s = H_PP - H_PZ H_ZZ^+ H_ZP`` and ``g_s = g_P - H_PZ H_ZZ^+ g_Z``.
   A negative eigenvalue of ``H_ZZ``, or a null direction that is not flat,
   makes ``m`` unbounded below: there is no minimiser (see ``on_unbounded``).
2. **Isotropic cubic model.** With ``y = D_P eta_P``, ``M = D_P^-1 H_s D_P^-1``,
   ``b = D_P^-1 g_s`` and ``c = lambda_int / 2`` the reduced model is
   ``-b^T y + y^T M y / 2 + (c / 3) ||y||^3``, the model of Y. Nesterov and
   B. T. Polyak ("Cubic regularization of Newton method and its global
   performance", Math. Program. 108, 2006) and C. Cartis, N. I. M. Gould and
   Ph. L. Toint (ARC: "Adaptive cubic regularisation methods for unconstrained
   optimization. Part I", Math. Program. 127, 2011). Its global minimisers are
   exactly the ``y`` with ``(M + c r I) y = b``, ``r = ||y||`` and
   ``M + c r I`` positive semi-definite (their Theorem 3.1); the other
   stationary points have a smaller ``r``, hence "the solution of largest
   ``||D eta||``".
3. **Secular equation.** ``M = Q diag(mu) Q^T`` is eigendecomposed once; with
   ``beta = Q^T b``, ``||y(r)||^2 = sum_i beta_i^2 / (mu_i + c r)^2`` and
   ``phi(r) = ||y(r)|| - r`` is strictly decreasing on
   ``r > r_0 = max(0, -mu_min / c)``, where ``M + c r I`` is positive definite,
   and tends to ``-inf``: it has at most one root there, found by Newton's
   method on ``1 / ||y(r)|| - 1 / r`` (concave and increasing: the form ARC
   uses) safeguarded by a bisection bracket, in the shift ``t = c (r - r_0)``
   so that ``mu_i + c r = (mu_i - mu_min) + t`` keeps its relative precision
   next to the pole: roots arbitrarily close to the boundary are resolved,
   continuously with the hard case. At most 300 iterations (typically 4 to 10),
   then the bracket's last point.
4. **Hard case** (A. R. Conn, N. I. M. Gould and Ph. L. Toint, "Trust-region
   methods", SIAM 2000, Chapter 7, for the secular equation and the hard case of
   the trust-region subproblem). When ``b`` is orthogonal to the bottom
   eigenspace of ``M`` (``mu_min < 0``) and ``||y(r_0)|| <= r_0``, ``phi`` has no
   root above ``r_0``: the minimisers are at ``r = r_0`` (``M + c r I``
   singular), ``y(r_0) + tau q`` for every unit ``q`` of the bottom eigenspace,
   ``tau = sqrt(r_0^2 - ||y(r_0)||^2)`` (a pair for a simple eigenvalue). All
   have the same model value; the one taken has the largest ``sum_s eta_s``
   (the larger learning rates overall). When that sum is the same for all,
   ``q`` is the first bottom eigenvector, signed so that the largest-magnitude
   entry of its image in ``eta`` is positive.
5. **Polish.** At most two Newton steps on the stationarity equation, on the
   balanced problem then on the original one, each kept only if it lowers that
   residual, remove the rounding of the change of variables.

Tolerances (``S`` subsets, ``n`` of them regularised, ``eps`` the float64
epsilon, on the balanced problem): an eigenvalue of ``H_ZZ`` within
``64 S eps ||H_ZZ||_F`` of zero is zero, and such a null direction ``v`` is flat
when ``||H_PZ v||`` and ``|g_Z . v|`` are within ``64 S eps`` times ``||H_PZ||_F``
and ``||g_Z||``. The bottom eigenspace of ``M`` holds the ``mu_i`` within
``tol = 64 n eps |mu_min|`` of ``mu_min``; the hard case is taken when ``b``'s
component there is both rounding (``<= 64 n eps ||b||``) and small enough that
the secular root would lie within ``tol`` of the boundary (``<= tol tau``);
otherwise the secular equation is solved. Inputs whose scaled problem overflows
float64 raise a :class:`CurvkitError` (a :class:`NonFiniteError` when the
minimiser itself is out of range): never a NaN.

Example:
    >>> import torch
    >>> step = cubic_step(torch.tensor([2.0]), torch.tensor([[4.0]]), torch.tensor([0.0]), 0.0)
    >>> step.case, step.eta
    ('newton', tensor([0.5000], dtype=torch.float64))
    >>> step = cubic_step(torch.tensor([2.0]), torch.tensor([[-1.0]]), torch.tensor([1.0]), 2.0)
    >>> step.case, round(step.eta.item(), 9), round(step.radius, 9)
    ('regularised', 2.0, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import CurvkitError, NonFiniteError, ShapeMismatchError, UnboundedModelError

__all__ = ["CASES", "ON_UNBOUNDED", "CubicStep", "UnboundedModelError", "cubic_step"]

CASES = ("newton", "regularised", "hard", "unbounded")
"""The values of :attr:`CubicStep.case` (see :class:`CubicStep`)."""

ON_UNBOUNDED = ("raise", "stationary")
"""What :func:`cubic_step` does when the cubic model is unbounded below."""

_EPS = torch.finfo(torch.float64).eps
_TOL = 64.0
_MAX_ITER = 300


@dataclass(frozen=True)
class CubicStep:
    """The learning rates of one anisotropic Nesterov step, and how they were found.

    ``case`` is one of :data:`CASES`:

    * ``"newton"``: no subset is regularised (``lambda_int = 0``, or every
      ``d_s = 0``) and ``H_bar`` is positive definite, or positive semi-definite
      with flat null directions: ``eta = H_bar^+ g_bar``, the (minimum-norm)
      global minimiser.
    * ``"regularised"``: the root of the secular equation, ``M + c r I`` positive
      definite: the unique global minimiser.
    * ``"hard"``: the hard case, ``r = -mu_min / c`` at the boundary with a bottom
      eigenvector component added: a global minimiser (its mirror image is the other
      one; a whole sphere of them when the bottom eigenvalue is multiple).
    * ``"unbounded"``: the model is unbounded below (only with
      ``on_unbounded="stationary"``): ``eta`` is the stationary point of largest
      ``||D eta||`` (the paper's step; ``H_bar^-1 g_bar`` when ``lambda_int = 0``),
      a saddle point, not a minimiser.

    Attributes:
        eta: ``[S]`` float64 learning rates, on the device of ``g_bar``.
        radius: ``r = ||D eta||``.
        case: One of :data:`CASES`.
        model_value: ``m(eta) = -g_bar^T eta + eta^T H_bar eta / 2 + lambda_int r^3 / 6``.
        detail: One line explaining the outcome.
    """

    eta: Tensor
    radius: float
    case: str
    model_value: float
    detail: str


def cubic_step(
    g_bar: Any,
    H_bar: Any,
    d: Any,
    lambda_int: float | Tensor,
    *,
    on_unbounded: str = "raise",
) -> CubicStep:
    """The global minimiser of the anisotropic Nesterov cubic model (see the module docstring).

    Solves, in float64, ``min_eta -g_bar^T eta + eta^T H_bar eta / 2 +
    (lambda_int / 6) ||D eta||^3`` with ``D = diag(d)``: the solution of largest
    ``||D eta||`` of ``eta = (H_bar + (lambda_int / 2) ||D eta|| D^2)^-1 g_bar``
    (Wolinski 2023), ``H_bar^-1 g_bar`` when ``lambda_int = 0``.

    Args:
        g_bar: ``[S]`` real tensor (any float dtype; converted to float64).
        H_bar: ``[S, S]`` symmetric real tensor (its symmetric part is used; a
            relative asymmetry ``||H - H^T||_F / ||H||_F`` above the square root of
            its dtype's epsilon raises).
        d: ``[S]`` non-negative diagonal of ``D`` (``|D3_s|^(1/3)``); zeros are allowed.
        lambda_int: Non-negative internal damping ``lambda_int``.
        on_unbounded: ``"raise"`` (default): an unbounded model raises
            :class:`UnboundedModelError`. ``"stationary"``: return case
            ``"unbounded"`` with the stationary point of largest ``||D eta||``
            (raises anyway when there is none: a null direction of ``H_bar`` on
            the unregularised subsets along which the model decreases linearly).

    Returns:
        A :class:`CubicStep`; ``eta`` is always finite.

    Raises:
        NonFiniteError: A NaN or Inf in ``g_bar``, ``H_bar`` or ``d``.
        ShapeMismatchError: Shapes other than ``[S]``, ``[S, S]``, ``[S]`` with ``S >= 1``.
        UnboundedModelError: The model is unbounded below (``on_unbounded="raise"``).
        CurvkitError: A negative or non-finite ``lambda_int``, a negative ``d_s``, an
            asymmetric or complex ``H_bar``, an unknown ``on_unbounded``.
    """
    if on_unbounded not in ON_UNBOUNDED:
        raise CurvkitError(f"unknown on_unbounded {on_unbounded!r}; use one of {list(ON_UNBOUNDED)}")
    device = g_bar.device if isinstance(g_bar, Tensor) else torch.device("cpu")
    g_in, H_in, d_in, lam_in = _validate(g_bar, H_bar, d, lambda_int)
    S = g_in.numel()
    # the model only sees lambda_int d_s^3: solve with max(d) = 1, lambda_int * max(d)^3 (exact invariance)
    d_n, lam, scale = _normalise(d_in, lam_in)
    c = lam / 2.0
    reg = (d_n > 0) & (lam > 0)
    # balance (exact invariance): e = s eta with s_s = d_s on the regularised subsets (there e = y),
    # sqrt|H_ss| (or 1) elsewhere, so that every tolerance below is relative to the subsets' own scale
    s_vec = torch.where(reg, d_n, H_in.diagonal().abs().sqrt())
    s_vec = torch.where(s_vec > 0, s_vec, torch.ones_like(s_vec))
    g = g_in / s_vec
    H = H_in / s_vec[:, None] / s_vec[None, :]
    H = (H + H.T) / 2
    if not bool(torch.isfinite(g).all() and torch.isfinite(H).all()):
        raise CurvkitError(
            "D^-1 H_bar D^-1 overflows float64: d (or the diagonal of H_bar) spans too many orders of "
            "magnitude; set the tiniest d_s to 0 (unregularised), or rescale"
        )
    P = torch.nonzero(reg).flatten()
    Z = torch.nonzero(~reg).flatten()

    # 1. The unregularised subsets: H_ZZ^+ over its non-zero eigenvalues, flat null directions.
    H_PP, H_PZ = H[P][:, P], H[P][:, Z]
    H_ZZ, g_P, g_Z = H[Z][:, Z], g[P], g[Z]
    W_pinv = torch.zeros(len(Z), len(Z), dtype=torch.float64)
    problems, flat = [], 0
    if len(Z):
        tol_w, tol_c, tol_g = (
            _TOL * S * _EPS * float(torch.linalg.vector_norm(x)) for x in (H_ZZ, H_PZ, g_Z)
        )
        w, V = torch.linalg.eigh(H_ZZ)
        null = w.abs() <= tol_w
        negative = w < -tol_w
        Vn = V[:, null]
        steep = (torch.linalg.vector_norm(H_PZ @ Vn, dim=0) > tol_c) | ((g_Z @ Vn).abs() > tol_g)
        flat = int(null.sum()) - int(steep.sum())
        where = _names(Z, len(Z) == S)
        if bool(negative.any()):
            problems.append(f"H_bar on {where} has {int(negative.sum())} negative eigenvalue(s)")
        if bool(steep.any()):
            problems.append(
                f"H_bar on {where} is singular and the model decreases linearly along "
                f"{int(steep.sum())} of its null direction(s) (g_bar or the coupling not orthogonal to it)"
            )
            _unbounded(problems, lam, "there is no stationary point either")
        if problems and on_unbounded == "raise":
            _unbounded(problems, lam, "pass on_unbounded='stationary' for the paper's step (a saddle point)")
        inv = torch.where(null, torch.zeros_like(w), 1.0 / torch.where(null, torch.ones_like(w), w))
        W_pinv = (V * inv) @ V.T
    flat_note = f"; {flat} flat direction(s) of H_bar (eta is 0 along them)" if flat else ""
    fin = (g, H, d_n / s_vec, lam, scale, s_vec, (g_in, H_in, d_n), device)

    if len(P) == 0:
        e = W_pinv @ g
        if problems:
            case = "unbounded"
            detail = (
                f"{'; '.join(problems)}: the model is unbounded below; eta = H_bar^+ g_bar is its "
                f"stationary point (the paper's unregularised step), not a minimiser{flat_note}"
            )
        else:
            case = "newton"
            why = "lambda_int = 0" if lam == 0 else "every d_s = 0"
            kind = "positive semi-definite" if flat else "positive definite"
            detail = f"no subset regularised ({why}) and H_bar {kind}: eta = H_bar^+ g_bar{flat_note}"
        return _finish(e, case, detail, *fin)

    # 2. The reduced isotropic model in y = e_P = D_P eta_P (Schur complement of the rest).
    M = H_PP - H_PZ @ W_pinv @ H_PZ.T
    M = (M + M.T) / 2
    b = g_P - H_PZ @ (W_pinv @ g_Z)
    y, hard, info = _isotropic_cubic(M, b, c, scale)

    def to_e(y: Tensor) -> Tensor:
        e = torch.zeros(S, dtype=torch.float64)
        e[P] = y
        if len(Z):
            e[Z] = W_pinv @ (g_Z - H_PZ.T @ y)
        return e

    if hard is not None:
        # every y + tau q, q a unit vector of the bottom eigenspace, has the same model value: take
        # the one of largest sum_s eta_s = sum_s e_s / s_s = const + w^T y
        tau, Q_B = hard
        w_sum = 1.0 / s_vec[P] - H_PZ @ (W_pinv @ (1.0 / s_vec[Z]))
        proj = Q_B @ (Q_B.T @ w_sum)
        if float(torch.linalg.vector_norm(proj)) > _TOL * S * _EPS * float(torch.linalg.vector_norm(w_sum)):
            q = proj / torch.linalg.vector_norm(proj)
        else:  # the sum does not tell: the first bottom eigenvector, its largest image in eta positive
            q = Q_B[:, 0]
            q_eta = (to_e(y + q) - to_e(y)) / s_vec
            q = q if float(q_eta[q_eta.abs().argmax()]) >= 0 else -q
        y = y + tau * q
    eliminated = f"; {len(Z)} subset(s) with d_s = 0 eliminated (Schur complement)" if len(Z) else ""
    if problems:
        case = "unbounded"
        detail = (
            f"{'; '.join(problems)}: the model is unbounded below; eta is the stationary point of "
            f"largest ||D eta|| (the paper's step), not a minimiser; {info}{flat_note}"
        )
    else:
        case = "hard" if hard is not None else "regularised"
        detail = f"{info}{eliminated}{flat_note}"
    return _finish(to_e(y), case, detail, *fin)


def _validate(g_bar: Any, H_bar: Any, d: Any, lambda_int: Any) -> tuple[Tensor, Tensor, Tensor, float]:
    tensors = []
    for name, value in (("g_bar", g_bar), ("H_bar", H_bar), ("d", d)):
        x = value if isinstance(value, Tensor) else torch.as_tensor(value)
        if x.is_complex():
            raise CurvkitError(f"{name} must be real, got {x.dtype}")
        tensors.append(x)
    g, H, dd = tensors
    S = g.shape[0] if g.dim() == 1 else -1
    if S < 1 or tuple(H.shape) != (S, S) or tuple(dd.shape) != (S,):
        raise ShapeMismatchError(
            f"cubic_step needs g_bar [S], H_bar [S, S] and d [S] with S >= 1, got "
            f"{tuple(g.shape)}, {tuple(H.shape)} and {tuple(dd.shape)}"
        )
    in_eps = torch.finfo(H.dtype).eps if H.is_floating_point() else _EPS
    g, H, dd = (x.detach().to(device="cpu", dtype=torch.float64) for x in (g, H, dd))
    for name, x in (("g_bar", g), ("H_bar", H), ("d", dd)):
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"{name} is not finite (NaN or Inf): {x.tolist()}")
    if bool((dd < 0).any()):
        raise CurvkitError(f"d must be non-negative (d_s = |D3_s|^(1/3)), got {dd.tolist()}")
    try:
        lam = float(lambda_int)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CurvkitError(f"lambda_int must be a number, got {lambda_int!r}") from err
    if not math.isfinite(lam) or lam < 0:
        raise CurvkitError(f"lambda_int must be a finite number >= 0, got {lam}")
    norm = float(torch.linalg.matrix_norm(H))
    asym = float(torch.linalg.matrix_norm(H - H.T))
    if asym > math.sqrt(in_eps) * norm:
        raise CurvkitError(
            f"H_bar is not symmetric: ||H - H^T|| / ||H|| = {asym / norm:.3g}; symmetrise it, (H + H^T) / 2"
        )
    return g, (H + H.T) / 2, dd, lam


def _normalise(d: Tensor, lam: float) -> tuple[Tensor, float, float]:
    """``(d / max(d), lambda_int * max(d)^3, max(d))``: the same model, ``max(d) = 1``."""
    top = float(d.max())
    if top == 0.0:
        return d, lam, 1.0
    lam_n = lam * top * top * top
    if lam > 0 and (lam_n == 0.0 or not math.isfinite(lam_n)):
        raise CurvkitError(
            f"lambda_int * max(d)^3 = {lam:.3g} * {top:.3g}^3 is out of float64 range: "
            "rescale lambda_int or d"
        )
    return d / top, lam_n, top


def _names(idx: Tensor, everything: bool) -> str:
    if everything:
        return "all subsets"
    shown = idx.tolist()
    text = ", ".join(map(str, shown[:8])) + (", ..." if len(shown) > 8 else "")
    return f"the unregularised subsets [{text}]"


def _unbounded(problems: list[str], lam: float, hint: str) -> None:
    way = "use lambda_int > 0 and d_s > 0 on these subsets" if lam == 0 else "make d_s > 0 on these subsets"
    raise UnboundedModelError(f"the cubic model is unbounded below: {'; '.join(problems)}; {hint}, or {way}")


def _safe_norm(z: Tensor) -> float:
    m = float(z.abs().max())
    if m == 0.0 or not math.isfinite(m):
        return m
    return m * float(torch.linalg.vector_norm(z / m))


def _isotropic_cubic(
    M: Tensor, b: Tensor, c: float, scale: float = 1.0
) -> tuple[Tensor, tuple[float, Tensor] | None, str]:
    """``(y, hard, info)``: the global minimiser of ``-b^T y + y^T M y / 2 + (c / 3) ||y||^3``, ``c > 0``.

    ``info`` reports radii times ``scale`` and eigenvalues and multipliers over
    ``scale^2``: the units of ``D^-1 H_bar D^-1`` when ``y = (D / scale) eta``.

    In the hard case ``hard`` is ``(tau, Q_B)``, ``Q_B`` an orthonormal basis of the
    bottom eigenspace: the minimisers are ``y + tau q`` for every unit ``q = Q_B x``;
    otherwise ``hard`` is ``None``.
    """
    n = b.numel()
    mu, Q = torch.linalg.eigh(M)
    beta = Q.T @ b
    if not bool(torch.isfinite(mu).all() and torch.isfinite(beta).all()):
        raise CurvkitError(
            f"the eigendecomposition of D^-1 H_bar D^-1 overflows float64 (max |entry| "
            f"{float(M.abs().max()):.3g}): d spans too many orders of magnitude; set the tiny d_s to 0"
        )
    mu_min = float(mu[0])
    sigma0 = max(0.0, -mu_min)
    a = (mu - mu_min if mu_min < 0 else mu).clamp_min(0.0)  # mu_i + sigma0 >= 0, exactly 0 at the bottom
    r0 = sigma0 / c
    if sigma0 == 0.0 and float(beta.abs().max()) == 0.0:
        return torch.zeros_like(b), None, "g_bar = 0 on the regularised subsets and M >= 0: y = 0, r = 0"

    def hard_case(bottom: Tensor) -> tuple[Tensor, tuple[float, Tensor], str] | None:
        safe = torch.where(bottom, torch.ones_like(a), a)
        z_perp = torch.where(bottom, torch.zeros_like(beta), beta / safe)
        n_perp = _safe_norm(z_perp)
        if not n_perp < r0:
            return None
        tau = r0 * math.sqrt((1.0 - n_perp / r0) * (1.0 + n_perp / r0))
        info = (
            "hard case: g_bar orthogonal to the bottom eigenvector of D^-1 H D^-1 "
            f"(mu_min = {mu_min / (scale * scale):.6g}); r = -mu_min / c = {r0 * scale:.6g}, "
            f"bottom-eigenvector component {tau * scale:.6g} added"
        )
        small = float(torch.linalg.vector_norm(beta[bottom]))
        if small > tol_a * tau or small > tol_b:
            return None
        return Q @ z_perp, (tau, Q[:, bottom]), info

    tol_a = _TOL * n * _EPS * sigma0
    tol_b = _TOL * n * _EPS * float(torch.linalg.vector_norm(b))
    if sigma0 > 0.0:
        # b's bottom component is rounding (<= tol_b) and the secular root would be within
        # t ~ ||beta_bottom|| / tau <= tol_a of the boundary: the hard case
        found = hard_case(a <= tol_a)
        if found is not None:
            return found

    def norm_y(t: float) -> float:
        den = a + t
        if bool((den == 0).any()):
            if bool((beta[den == 0] != 0).any()):
                return math.inf
            den = torch.where(den == 0, torch.ones_like(den), den)
        return _safe_norm(beta / den)

    def f(t: float) -> float:  # ||y|| - r, strictly decreasing in t
        return norm_y(t) - (sigma0 + t) / c

    def newton(t: float) -> float:  # Newton's step on 1 / ||y|| - c / (sigma0 + t)
        if t <= 0.0 or sigma0 + t <= 0.0:
            return math.nan
        z = beta / (a + t)
        m = float(z.abs().max())
        if m == 0.0 or not math.isfinite(m):
            return math.nan
        zs = z / m
        ns = float(torch.linalg.vector_norm(zs))
        psi = 1.0 / (m * ns) - c / (sigma0 + t)
        dpsi = float((zs * zs / (a + t)).sum()) / (m * ns * ns * ns) + c / ((sigma0 + t) * (sigma0 + t))
        return t - psi / dpsi

    if sigma0 > 0.0 and f(0.0) <= 0.0:  # b exactly orthogonal to the bottom eigenspace: the exact hard case
        found = hard_case(a == 0)
        bottom = a == 0
        if found is not None:
            return found
        y = Q @ torch.where(bottom, torch.zeros_like(beta), beta / torch.where(bottom, torch.ones_like(a), a))
        return (
            y,
            None,
            f"secular root at the boundary r = -mu_min / c = {r0 * scale:.6g} (M + c r I singular)",
        )

    lo, hi = 0.0, math.sqrt(c * float(torch.linalg.vector_norm(b)))
    if not math.isfinite(hi):
        raise CurvkitError(
            f"lambda_int * max(d)^3 * ||D^-1 g_bar|| = {c * float(torch.linalg.vector_norm(b)):.3g} is "
            "out of float64 range: rescale lambda_int, d or g_bar"
        )
    for _ in range(64):
        if f(hi) <= 0:
            break
        lo, hi = hi, 2.0 * hi
    t, iterations = hi / 2.0, 0
    while iterations < _MAX_ITER:
        iterations += 1
        value = f(t)
        if value == 0.0:
            break
        if value > 0:
            lo = t
        else:
            hi = t
        if hi - lo <= 2.0 * _EPS * hi:
            break
        step = newton(t)
        if math.isfinite(step) and abs(step - t) <= 2.0 * _EPS * t:
            break  # converged: Newton's step is below the rounding of t
        if math.isfinite(step) and lo < step < hi:
            new = step
        elif lo == 0.0:
            new = hi / 16.0
        elif hi > 4.0 * lo:
            new = math.sqrt(lo * hi)
        else:
            new = (lo + hi) / 2.0
        t = new
    y = Q @ (beta / (a + t))
    info = (
        f"secular root r = {(sigma0 + t) / c * scale:.10g} ({iterations} iterations): M + c r I positive "
        f"definite (c r = {(sigma0 + t) / (scale * scale):.6g} > -mu_min = {-mu_min / (scale * scale):.6g})"
    )
    return y, None, info


def _residual(eta: Tensor, g: Tensor, H: Tensor, d2: Tensor, c: float) -> Tensor:
    r = torch.linalg.vector_norm(eta * d2.sqrt())
    return H @ eta + c * r * d2 * eta - g


def _polish(eta: Tensor, g: Tensor, H: Tensor, d2: Tensor, c: float) -> Tensor:
    """At most two Newton steps on the stationarity equation, each kept only if it lowers the residual."""
    res = _residual(eta, g, H, d2, c)
    best = float(torch.linalg.vector_norm(res))
    for _ in range(2):
        if best == 0.0:
            break
        r = float(torch.linalg.vector_norm(eta * d2.sqrt()))
        J = H + c * r * torch.diag(d2)
        if r > 0:
            u = d2 * eta
            J = J + (c / r) * torch.outer(u, u)
        try:
            delta = torch.linalg.solve(J, res)
        except RuntimeError:  # singular: keep what we have
            break
        if not bool(torch.isfinite(delta).all()):
            break
        if float(torch.linalg.vector_norm(delta)) > 1e-6 * (float(torch.linalg.vector_norm(eta)) + 1e-300):
            break  # not a rounding correction
        candidate = eta - delta
        res_c = _residual(candidate, g, H, d2, c)
        norm_c = float(torch.linalg.vector_norm(res_c))
        if not norm_c < best:
            break
        eta, res, best = candidate, res_c, norm_c
    return eta


def _finish(
    e: Tensor,
    case: str,
    detail: str,
    g: Tensor,
    H: Tensor,
    d_e: Tensor,
    lam: float,
    scale: float,
    s_vec: Tensor,
    original: tuple[Tensor, Tensor, Tensor],
    device: torch.device,
) -> CubicStep:
    """Polish, check and package the balanced solution ``e = s eta`` (``D eta = scale * d_e * e``).

    The polish runs on the balanced equation, then on the original one (``g_bar``,
    ``H_bar``, ``d / max(d)``), each step kept only where it lowers that residual.
    """
    c = lam / 2.0
    zero = torch.zeros_like(d_e)
    e = _polish(e, g, H, d_e * d_e if lam > 0 else zero, c)
    g_in, H_in, d_n = original
    eta = _polish(e / s_vec, g_in, H_in, d_n * d_n if lam > 0 else zero, c)
    r = _safe_norm(d_n * eta)
    cube_root = lam ** (1.0 / 3.0) * r
    value = float(-g_in @ eta + 0.5 * eta @ H_in @ eta) + cube_root * cube_root * cube_root / 6.0
    if not (bool(torch.isfinite(eta).all()) and math.isfinite(r * scale) and math.isfinite(value)):
        raise NonFiniteError(
            f"the cubic step overflows float64 (||eta|| = {_safe_norm(eta):.3g}, m = {value:.3g}; {case}: "
            f"{detail}): lambda_int is too small to hold H_bar's negative curvature in range"
        )
    return CubicStep(eta.to(device), r * scale, case, value, detail)
