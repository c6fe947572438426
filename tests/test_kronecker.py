"""``KroneckerOperator``: every structured method against a dense matrix built independently.

The dense truth places each group's ``kron(B_g, A_g)`` at the flat indices of the
block's ``[groups, o, k]`` numbers (weight reshaped, folded bias as the last
input column), computed here from the layout alone.
"""

from __future__ import annotations

import math

import pytest
import torch

import curvkit
from curvkit.kronecker import KroneckerBlock, KroneckerOperator
from curvkit.layout import ParameterLayout

DT = torch.float64
TIGHT = 1e-11

# a Linear weight [3, 4] with its bias folded; a grouped conv weight [4, 1, 2, 1] (groups 2)
# with a separate bias block; a parameter in no block
LAYOUT = ParameterLayout(
    ("fc.weight", "fc.bias", "conv.weight", "conv.bias", "free"),
    (torch.Size([3, 4]), torch.Size([3]), torch.Size([4, 1, 2, 1]), torch.Size([4]), torch.Size([2])),
)


def spd(n: int, groups: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(groups, n, n + 2, dtype=DT, generator=gen)
    return R @ R.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=DT)


def blocks(scaled: bool = False) -> list[KroneckerBlock]:
    fc = KroneckerBlock(weight=0, bias=1, A=spd(5, seed=1), B=spd(3, seed=2), name="fc")
    conv = KroneckerBlock(weight=2, bias=None, A=spd(2, 2, seed=3), B=spd(2, 2, seed=4), name="conv")
    conv_bias = KroneckerBlock(weight=None, bias=3, A=torch.ones(1, 1, 1, dtype=DT), B=spd(4, seed=5))
    if scaled:
        gen = torch.Generator().manual_seed(6)
        fc.scalings = torch.rand(1, 3, 5, dtype=DT, generator=gen) + 0.1
        conv.scalings = torch.rand(2, 2, 2, dtype=DT, generator=gen) + 0.1
    return [fc, conv, conv_bias]


def flat_indices(block: KroneckerBlock) -> torch.Tensor:
    """Flat index of every ``[g, o, k]`` entry of the block."""
    groups, o, k = block.shape
    offsets = LAYOUT.offsets
    index = torch.empty(groups, o, k, dtype=torch.long)
    width = k - (block.weight is not None and block.bias is not None)
    for g in range(groups):
        for i in range(o):
            for j in range(k):
                if block.weight is not None and j < width:
                    index[g, i, j] = offsets[block.weight] + (g * o + i) * width + j
                else:
                    index[g, i, j] = offsets[block.bias] + g * o + i
    return index.reshape(-1)


def dense(blocks_: list[KroneckerBlock]) -> torch.Tensor:
    P = LAYOUT.dim
    out = torch.zeros(P, P, dtype=DT)
    for block in blocks_:
        groups = block.shape[0]
        parts = []
        for g in range(groups):
            if block.scalings is None:
                parts.append(torch.kron(block.B[g], block.A[g]))
            else:
                _, QA = torch.linalg.eigh(block.A[g])
                _, QB = torch.linalg.eigh(block.B[g])
                Q = torch.kron(QB, QA)
                parts.append(Q @ torch.diag(block.scalings[g].reshape(-1)) @ Q.T)
        idx = flat_indices(block)
        out[idx[:, None], idx[None, :]] = torch.block_diag(*parts)
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scaled", [False, True], ids=["kfac", "eigenvalue-corrected"])
def test_every_method_equals_dense_linear_algebra(scaled):
    bl = blocks(scaled)
    op = KroneckerOperator(LAYOUT, bl, dtype=DT, device="cpu")
    truth = dense(bl)
    eye = torch.eye(LAYOUT.dim, dtype=DT)
    assert rel(op.to_dense(), truth) < TIGHT
    assert rel(op.diagonal(), torch.diagonal(truth)) < TIGHT
    assert math.isclose(op.trace(), torch.trace(truth).item(), rel_tol=1e-12)
    damping = 0.3
    inverse = torch.linalg.inv(truth + damping * eye)
    assert rel(op.inverse(damping).to_dense(), inverse) < TIGHT
    v = torch.randn(LAYOUT.dim, 3, dtype=DT)
    assert rel(op.solve(v, damping), inverse @ v) < TIGHT
    assert math.isclose(op.logdet(damping), torch.logdet(truth + damping * eye).item(), rel_tol=1e-12)
    values = torch.linalg.eigvalsh(truth)
    top = curvkit.eigenvalues(op, k=4, tol=1e-10)
    assert top.method == "exact" and top.converged
    assert torch.allclose(top.values, values.flip(0)[:4], rtol=1e-12)
    bottom = curvkit.eigenvalues(op, k=3, which="smallest", tol=1e-10)
    assert torch.allclose(bottom.values, values[:3], atol=1e-14)  # two zeros: the free parameter
    assert bottom.converged
    with pytest.raises(curvkit.CurvkitError, match="needs damping"):
        op.inverse()
    with pytest.raises(curvkit.CurvkitError, match="needs damping"):
        op.logdet()


def test_an_operator_covering_every_parameter_inverts_without_damping():
    layout = ParameterLayout(("w", "b"), (torch.Size([3, 4]), torch.Size([3])))
    block = KroneckerBlock(weight=0, bias=1, A=spd(5, seed=1), B=spd(3, seed=2))
    op = KroneckerOperator(layout, [block], dtype=DT, device="cpu")
    truth = torch.kron(block.B[0], block.A[0])
    idx = torch.tensor([i * 4 + j if j < 4 else 12 + i for i in range(3) for j in range(5)])
    want = torch.zeros(15, 15, dtype=DT)
    want[idx[:, None], idx[None, :]] = truth
    assert rel(op.inverse().to_dense(), torch.linalg.inv(want)) < TIGHT
    assert math.isclose(op.logdet(), torch.logdet(want).item(), rel_tol=1e-12)


def test_factored_damping():
    bl = blocks()
    op = KroneckerOperator(LAYOUT, bl, dtype=DT, device="cpu")
    gamma = 0.04
    for kind in ("factored", "pi"):
        damped = op.damped(gamma, kind=kind)
        want = []
        for block in bl:
            groups, o, k = block.shape
            a = torch.diagonal(block.A, dim1=1, dim2=2).sum(-1) / k
            b = torch.diagonal(block.B, dim1=1, dim2=2).sum(-1) / o
            pi = torch.sqrt(a / b) if kind == "pi" else torch.ones(groups, dtype=DT)
            A = block.A + (pi * gamma**0.5)[:, None, None] * torch.eye(k, dtype=DT)
            B = block.B + (gamma**0.5 / pi)[:, None, None] * torch.eye(o, dtype=DT)
            want.append(KroneckerBlock(block.weight, block.bias, A, B))
        truth = dense(want)
        free = LAYOUT.slices()["free"]
        truth[free, free] += gamma * torch.eye(2, dtype=DT)
        assert rel(damped.to_dense(), truth) < TIGHT, kind
        assert rel(damped.inverse().to_dense(), torch.linalg.inv(truth)) < TIGHT, kind
    identity = op.damped(gamma)
    assert rel(identity.to_dense(), dense(bl) + gamma * torch.eye(LAYOUT.dim, dtype=DT)) < TIGHT
    assert "inverse" in identity.STRUCTURE and "eigenvalues" in identity.STRUCTURE
    with pytest.raises(curvkit.CurvkitError, match="unknown damping kind"):
        op.damped(gamma, kind="tikhonov")
    corrected = KroneckerOperator(LAYOUT, blocks(scaled=True), dtype=DT, device="cpu")
    with pytest.raises(curvkit.CurvkitError, match="use kind='identity'"):
        corrected.damped(gamma, kind="pi")


def test_restrict_keeps_whole_blocks_and_cuts_others_generically():
    bl = blocks()
    op = KroneckerOperator(LAYOUT, bl, dtype=DT, device="cpu")
    truth = dense(bl)
    sub = op.restrict(["conv", "free"])
    assert isinstance(sub, KroneckerOperator)
    idx = LAYOUT.indices(["conv.weight", "conv.bias", "free"])
    assert rel(sub.to_dense(), truth[idx][:, idx]) < TIGHT
    assert math.isclose(sub.trace(), torch.trace(truth[idx][:, idx]).item(), rel_tol=1e-12)
    cut = op.restrict("fc.weight")  # the folded block cut in two
    assert isinstance(cut, curvkit.RestrictedOperator)
    idx = LAYOUT.indices(["fc.weight"])
    assert rel(cut.to_dense(), truth[idx][:, idx]) < TIGHT
    scaled = (2.0 * op).restrict("conv")
    assert isinstance(scaled.op, KroneckerOperator)


def test_diagonal_operator():
    d = torch.tensor([3.0, 1.0, 2.0], dtype=DT)
    D = curvkit.DiagonalOperator(d)
    assert D.trace() == 6.0 and math.isclose(D.logdet(1.0), math.log(4 * 2 * 3))
    assert torch.allclose(D.inverse(1.0).diagonal(), 1 / (d + 1))
    res = curvkit.eigenvalues(D, k=2)
    assert res.method == "exact" and res.values.tolist() == [3.0, 2.0]
