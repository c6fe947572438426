"""The benchmark problems: models and fixed-seed synthetic data, defined once.

Every method in the suite differentiates the same function: the mean
cross-entropy of the model over the whole data set, with the model in
evaluation mode (BatchNorm uses its running statistics). The data are
synthetic but fixed by a seed, with labels from a random "teacher" so that the
loss has structure.

Problems:

* ``mlp``: 784-128-64-10 ReLU network, 512 digit-sized samples.
* ``cnn``: CIFAR-shaped (3x32x32) network with two Conv2d + max-pooling stages, 256 samples.
* ``transformer``: one pre-norm transformer block (token and position embeddings,
  self-attention, LayerNorm, MLP), sequences of 16 tokens, width 32, 128
  samples, classified from the mean-pooled tokens.
* ``batchnorm``: Conv2d-BatchNorm2d-ReLU block twice and a linear head, in
  evaluation mode with running statistics collected beforehand, 256 samples.

Not in :data:`PROBLEMS` (used by the spectral sections only):

* :func:`make_trained_mlp`: the ``mlp`` after a few hundred full-batch Adam steps
  on its own data (seeded), a stand-in for a trained checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import curvkit

__all__ = ["PROBLEMS", "BenchProblem", "build_problems", "make_trained_mlp", "teacher_labels"]

NUM_CLASSES = 10


@dataclass
class BenchProblem:
    """A model with its data: the full-data mean cross-entropy to differentiate.

    Attributes:
        name: Short key (``"mlp"``, ...).
        description: One line for the report.
        model: The network, in evaluation mode.
        inputs: All inputs, one batch.
        targets: All class labels.
    """

    name: str
    description: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor

    @property
    def params(self) -> list[Tensor]:
        """The parameters, in ``model.parameters()`` order (the flat order)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def dim(self) -> int:
        """Number of scalar parameters ``P``."""
        return sum(p.numel() for p in self.params)

    @property
    def num_samples(self) -> int:
        """Number of samples."""
        return self.targets.shape[0]

    def criterion(self) -> nn.Module:
        """The loss module: mean cross-entropy over a batch."""
        return nn.CrossEntropyLoss()

    def loss(self) -> Tensor:
        """The full-data mean loss, with the autograd graph of the model's parameters."""
        return self.criterion()(self.model(self.inputs), self.targets)

    def curvkit_problem(self) -> curvkit.Problem:
        """The same function as a :class:`curvkit.Problem` (one batch of all the data)."""
        return curvkit.Problem(
            self.model, "cross_entropy", (self.inputs, self.targets), batch_size=self.num_samples
        )

    def split(self, flat: Tensor) -> list[Tensor]:
        """A flat ``[P]`` vector as tensors shaped like the parameters."""
        return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def random_vectors(self, count: int, seed: int) -> list[Tensor]:
        """``count`` fixed-seed standard normal ``[P]`` vectors."""
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(self.dim, generator=gen).to(self.inputs.device) for _ in range(count)]


def teacher_labels(inputs: Tensor, gen: torch.Generator) -> Tensor:
    """Labels of a random linear teacher on the flattened inputs."""
    flat = inputs.reshape(inputs.shape[0], -1).float()
    weights = torch.randn(flat.shape[1], NUM_CLASSES, generator=gen)
    return (flat @ weights).argmax(dim=1)


def make_mlp(seed: int = 0) -> BenchProblem:
    """784-128-64-10 ReLU MLP on 512 digit-sized samples."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(512, 784, generator=gen)
    targets = teacher_labels(inputs, gen)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES)
    )
    return BenchProblem("mlp", "MLP 784-128-64-10 (ReLU), 512 samples", model.eval(), inputs, targets)


def make_cnn(seed: int = 0) -> BenchProblem:
    """CIFAR-shaped CNN: two Conv2d + ReLU + MaxPool2d stages and a linear head, 256 samples."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 3, 32, 32, generator=gen)
    targets = teacher_labels(inputs, gen)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, NUM_CLASSES),
    )
    return BenchProblem(
        "cnn",
        "CNN 3x32x32, Conv2d(3->8)+ReLU+MaxPool2d, Conv2d(8->16)+ReLU+MaxPool2d, Linear, 256 samples",
        model.eval(),
        inputs,
        targets,
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention written out with matmuls and softmax.

    ``nn.MultiheadAttention`` dispatches to ``scaled_dot_product_attention``, whose
    CPU flash kernel has no double backward in torch 2.13 (``derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented``), so no reverse-over-reverse Hessian product could run on it.

    Args:
        width: Model width.
        heads: Number of heads (dividing ``width``).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """Attention outputs ``[N, T, width]`` for ``x`` of the same shape."""
        n, t, width = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / (width // self.heads) ** 0.5
        mixed = scores.softmax(dim=-1) @ v  # [N, heads, T, width / heads]
        return self.out(mixed.transpose(1, 2).reshape(n, t, width))


class TransformerClassifier(nn.Module):
    """Token and position embeddings, one pre-norm transformer block, mean pooling, linear head.

    Args:
        vocab: Vocabulary size.
        seq_len: Sequence length.
        width: Model width ``d``.
        heads: Attention heads.
    """

    def __init__(self, vocab: int = 64, seq_len: int = 16, width: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        """Class logits ``[N, classes]`` for tokens ``[N, seq_len]``."""
        x = self.embed(tokens) + self.position
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def make_transformer(seed: int = 0) -> BenchProblem:
    """One transformer block, sequences of 16 tokens, width 32, 128 samples."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 64, (128, 16), generator=gen)
    targets = teacher_labels(torch.nn.functional.one_hot(inputs, 64), gen)
    torch.manual_seed(seed)
    model = TransformerClassifier()
    return BenchProblem(
        "transformer",
        "Transformer block (attention + LayerNorm + MLP), seq 16, d 32, 128 samples",
        model.eval(),
        inputs,
        targets,
    )


def make_batchnorm(seed: int = 0) -> BenchProblem:
    """Two Conv2d-BatchNorm2d-ReLU stages and a linear head, in eval mode, 256 samples of 3x16x16."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 3, 16, 16, generator=gen)
    targets = teacher_labels(inputs, gen)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, NUM_CLASSES),
    )
    with torch.no_grad():  # collect running statistics, then freeze them
        model.train()
        for chunk in inputs.split(64):
            model(chunk)
    return BenchProblem(
        "batchnorm",
        "Conv2d+BatchNorm2d (eval mode) x2 + Linear, 3x16x16, 256 samples",
        model.eval(),
        inputs,
        targets,
    )


TRAIN_STEPS, TRAIN_LR = 300, 1e-3


def make_trained_mlp(seed: int = 0, steps: int = TRAIN_STEPS, lr: float = TRAIN_LR) -> BenchProblem:
    """The ``mlp`` trained by ``steps`` full-batch Adam steps on its 512 samples (seeded, ~1 s).

    The description records the final loss and training accuracy. Gradients are
    cleared afterwards; the model is left in evaluation mode.
    """
    problem = make_mlp(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        problem.loss().backward()
        optimizer.step()
    for p in problem.params:
        p.grad = None
    with torch.no_grad():
        logits = problem.model(problem.inputs)
        loss = problem.criterion()(logits, problem.targets).item()
        accuracy = (logits.argmax(dim=1) == problem.targets).float().mean().item()
    problem.name = "mlp-trained"
    problem.description = (
        f"MLP 784-128-64-10 (ReLU), 512 samples, after {steps} full-batch Adam steps "
        f"(lr {lr:g}, seed {seed}): loss {loss:.2e}, training accuracy {100 * accuracy:.0f}%"
    )
    return problem


PROBLEMS: dict[str, Callable[[], BenchProblem]] = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "transformer": make_transformer,
    "batchnorm": make_batchnorm,
}


def build_problems(names: list[str] | None = None) -> list[BenchProblem]:
    """The problems named (all by default), in :data:`PROBLEMS` order.

    Raises:
        ValueError: An unknown problem name.
    """
    unknown = sorted(set(names or ()) - set(PROBLEMS))
    if unknown:
        raise ValueError(f"unknown problem(s) {unknown}; choose from {list(PROBLEMS)}")
    return [make() for key, make in PROBLEMS.items() if names is None or key in names]
