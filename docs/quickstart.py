"""A two-minute tour of curvkit on a small network trained here on synthetic spirals.

Run it with ``python docs/quickstart.py``. It trains a tanh MLP, then computes
Hessian-vector products of the full-dataset loss, the dense Hessian's extreme
eigenvalues and trace, and checks the matrix-free operator against the dense one.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

import curvkit


def spirals(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals: a classic small non-linear classification task."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi
    label = torch.arange(n) % 2
    sign = 1 - 2 * label.float()
    X = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 10
    return X + 0.02 * torch.randn(n, 2, generator=g), label


def main() -> None:
    torch.manual_seed(0)
    X, y = spirals()
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    accuracy = (model(X).argmax(1) == y).float().mean().item()

    problem = curvkit.Problem(model, "cross_entropy", (X, y), batch_size=128)
    print(problem)
    print(f"training accuracy {accuracy:.3f}")

    H = curvkit.curvature("hessian", problem)
    v = torch.randn(problem.dim)
    start = time.perf_counter()
    Hv = H @ v
    print(f"one Hessian-vector product over {len(X)} samples: {1e3 * (time.perf_counter() - start):.1f} ms")

    dense = curvkit.curvature("exact-hessian", problem).to_dense()
    eigs = torch.linalg.eigvalsh(dense)
    print(f"exact Hessian {tuple(dense.shape)}: largest eigenvalues {eigs[-3:].flip(0).tolist()}")
    print(f"smallest eigenvalue {eigs[0].item():.4g}, trace {dense.trace().item():.4g}")
    gap = ((Hv - dense @ v).norm() / Hv.norm()).item()
    print(f"matrix-free vs dense product, relative difference {gap:.1e}")
    for name in ("0", "2", "4"):
        block = H.restrict(name).to_dense()
        print(f"layer {name}: top eigenvalue {torch.linalg.eigvalsh(block)[-1].item():.4g}")


if __name__ == "__main__":
    main()
