"""Per-layer tables against dense blocks of the exact Hessian."""

from __future__ import annotations

import math

import pytest
import torch

import curvkit
from curvkit.linalg.per_layer import layer_blocks
from curvkit.testing import dense_hessian_reference, get_case


def test_layer_blocks_group_by_module_or_parameter():
    names = ["0.weight", "0.bias", "block.attn.weight", "scale"]
    assert layer_blocks(names, "module") == {
        "0": ["0.weight", "0.bias"],
        "block.attn": ["block.attn.weight"],
        "scale": ["scale"],
    }
    assert list(layer_blocks(names, "parameter")) == names
    with pytest.raises(curvkit.CurvkitError, match="by must be"):
        layer_blocks(names, "layer")


@pytest.mark.parametrize("by", ["module", "parameter"])
def test_per_layer_matches_dense_blocks(by):
    problem = get_case("attention-layernorm-ce").problem()
    H = curvkit.curvature("hessian", problem)
    truth = dense_hessian_reference(problem)
    seen = []
    table = curvkit.per_layer(H, by=by, tol=1e-10, progress=seen.append)
    blocks = layer_blocks(problem.layout.names, by)
    assert [row.name for row in table] == list(blocks) and len(seen) == len(blocks)
    for row in table:
        idx = problem.layout.indices(row.params)
        block = truth[idx][:, idx]
        assert row.dim == len(idx)
        assert math.isclose(
            row.top_eigenvalue, torch.linalg.eigvalsh(block)[-1].item(), rel_tol=1e-8, abs_tol=1e-12
        )
        assert row.trace_method == "exact" and row.trace_stderr == 0
        assert math.isclose(row.trace, block.trace().item(), rel_tol=1e-10, abs_tol=1e-12)
        assert row.converged and row.matvecs > 0
    columns = table.to_dict()
    assert columns["name"] == [row.name for row in table] and len(columns["trace"]) == len(table)


def test_per_layer_stochastic_trace_for_large_blocks():
    problem = get_case("tanh-mlp-ce").problem()
    table = curvkit.per_layer(curvkit.curvature("hessian", problem), exact_trace_max_dim=20, trace_matvecs=12)
    rows = {row.name: row for row in table}
    assert (rows["0"].dim, rows["2"].dim) == (25, 18)
    # Hutch++ by default; a 4-column sketch of this block misses too much, so it falls back
    assert rows["0"].trace_method in ("hutch++", "hutchinson") and rows["0"].trace_stderr > 0
    assert rows["2"].trace_method == "exact" and rows["2"].trace_stderr == 0
