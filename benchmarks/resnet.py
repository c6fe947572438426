"""ResNet-18 on one device: a Hessian-vector product against a gradient, and the top-5 eigenvalues.

``python -m benchmarks --only resnet [--device cuda]``. The model is the CIFAR
form of ResNet-18 (K. He, X. Zhang, S. Ren and J. Sun, "Deep residual learning
for image recognition", CVPR 2016: a 3x3 stem, four stages of two basic blocks
with 64, 128, 256 and 512 channels, global average pooling, a linear head;
11,173,962 parameters), BatchNorm in evaluation mode with running statistics
collected on the data, on fixed-seed CIFAR-shaped samples (:data:`SAMPLES`: 128
on a GPU, 16 on a CPU, where a product takes seconds). Everything runs on the
chosen device, curvkit and the peers alike; every timed call ends with
:func:`benchmarks.timing.synchronize`.

Two measurements, recorded with the device's name:

* **HVP / gradient**: the rows of :mod:`benchmarks.hvp` (curvkit, raw torch,
  PyHessian, curvlinops, BackPACK, hessian-eigenthings), each product's median
  over interleaved rounds divided by the gradient's (loss and backward). The
  goal: curvkit's product at most :data:`HVP_GOAL` gradients (curvlinops
  measured 2.25x compiled and 7.9x eager on a GPU).
* **Top-5 eigenvalues**: curvkit at tol 1e-3, PyHessian with its defaults and
  curvlinops' operator under SciPy's ``eigsh`` at tol 1e-3, against ARPACK at
  tol 1e-10 on curvkit's operator (:func:`benchmarks.spectral.run_eigen`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.hvp import Goal, HVPRow, ProblemRecord, run_hvp
from benchmarks.problems import NUM_CLASSES, BenchProblem, teacher_labels
from benchmarks.spectral import EigenProblem, SpectralSettings, run_eigen
from benchmarks.spectral_methods import (
    PYHESSIAN_DEFAULT,
    SpectralMethod,
    curvkit_eigen,
    curvlinops_eigsh,
    pyhessian_eigen,
)
from benchmarks.timing import OtherLoad, machine_info

__all__ = ["ResnetResult", "evaluate_resnet_goals", "make_resnet18", "run_resnet"]

SAMPLES = {"cuda": 128, "cpu": 16}
"""Samples (one batch) by device type."""

HVP_GOAL = 2.0
"""curvkit's Hessian-vector product at most this many gradients."""

REPEATS = {"cuda": 15, "cpu": 5}
"""Timed rounds of the HVP rows by device type (a CPU product of ResNet-18 takes seconds)."""

EIGEN_TOL = 1e-3

EIGEN_METHODS = (
    SpectralMethod(
        f"curvkit eigenvalues, tol {EIGEN_TOL:g}",
        "curvkit",
        curvkit_eigen(EIGEN_TOL),
        f"`curvkit.eigenvalues(H, k=5, which='largest', tol={EIGEN_TOL:g})`",
        f"tol {EIGEN_TOL:g}",
    ),
    SpectralMethod(
        "PyHessian eigenvalues, defaults",
        "peer",
        pyhessian_eigen(*PYHESSIAN_DEFAULT),
        "`hessian(model, criterion, data=(X, y), cuda=...).eigenvalues(top_n=5)`: deflated power iteration",
        f"maxIter {PYHESSIAN_DEFAULT[0]}, tol {PYHESSIAN_DEFAULT[1]:g}",
    ),
    SpectralMethod(
        f"curvlinops + scipy eigsh, tol {EIGEN_TOL:g}",
        "peer",
        curvlinops_eigsh(EIGEN_TOL),
        f"`eigsh(HessianLinearOperator(...).to_scipy(), k=5, which='LA', tol={EIGEN_TOL:g}, v0=...)`",
        f"tol {EIGEN_TOL:g}",
    ),
)
"""The top-5 rows: curvkit first (the reference of the time ratios)."""


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (projected where the shape changes)."""

    def __init__(self, channels_in: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (module docstring)."""

    def __init__(self, classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, channels_in = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels, 1)]
            channels_in = channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


def make_resnet18(device: torch.device, samples: int, seed: int = 0) -> BenchProblem:
    """ResNet-18 on ``samples`` fixed-seed CIFAR-shaped samples on ``device``, in evaluation mode."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 3, 32, 32, generator=gen)
    targets = teacher_labels(inputs, gen)
    torch.manual_seed(seed)
    model = ResNet18().to(device)
    inputs, targets = inputs.to(device), targets.to(device)
    with torch.no_grad():  # running statistics from the data, then frozen
        model.train()
        model(inputs)
    return BenchProblem(
        "resnet18",
        f"ResNet-18 (CIFAR form, BatchNorm in eval mode), 3x32x32, {samples} samples",
        model.eval(),
        inputs,
        targets,
    )


@dataclass
class ResnetResult(ProblemRecord):
    """The ResNet-18 measurements on one device.

    Attributes:
        device: The device, named (``"cuda: NVIDIA H200"``, ``"cpu: <model>, N cores"``).
        gradient_ms: The gradient's median time.
        hvp: The HVP rows (as in :mod:`benchmarks.hvp`).
        eigen: The top-5 rows, or ``None`` (``--quick``).
        repeats: Timed rounds of the HVP rows.
        other_load: CPU share of other processes meanwhile.
    """

    device: str = ""
    gradient_ms: float | None = None
    hvp: list[HVPRow] = field(default_factory=list)
    eigen: EigenProblem | None = None
    repeats: int = 0
    other_load: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    info = machine_info()
    return f"cpu: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"


def resolve(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_resnet(device: str, quick: bool) -> list[ResnetResult]:
    """The HVP rows and (unless ``quick``) the top-5 rows of ResNet-18 on ``device``."""
    target = resolve(device)
    samples = 8 if quick else SAMPLES.get(target.type, SAMPLES["cpu"])
    repeats = 2 if quick else REPEATS.get(target.type, REPEATS["cpu"])
    problem = make_resnet18(target, samples)
    res = ResnetResult(
        problem.name,
        problem.description,
        problem.dim,
        problem.num_samples,
        _device_name(target),
        repeats=repeats,
    )
    load = OtherLoad().start()
    res.gradient_ms, res.hvp = run_hvp(problem, repeats, warmup=1)
    if not quick:
        res.eigen = run_eigen(problem, SpectralSettings(eigen_rounds=1, cross_check=False), EIGEN_METHODS)
    res.other_load = load.stop()
    return [res]


def evaluate_resnet_goals(results: Sequence[ResnetResult]) -> list[Goal]:
    """curvkit's Hessian-vector product at most :data:`HVP_GOAL` gradients, on the device measured."""
    goals = []
    for res in results:
        row = next((r for r in res.hvp if r.method == "curvkit hessian"), None)
        ratio = None if row is None else row.ratio_to_gradient
        detail = (
            "not measured"
            if ratio is None
            else f"{ratio:.2f}x ({row.median_ms:.1f} ms; gradient {res.gradient_ms:.1f} ms) on {res.device}"
        )
        goals.append(
            Goal(
                f"HVP at most {HVP_GOAL:g}x a gradient (ResNet-18)",
                res.name,
                None if ratio is None else ratio <= HVP_GOAL,
                detail,
            )
        )
    return goals
