"""Regenerate curvkit's bundled dataset and checkpoints (see README.md in this folder).

Usage (from the repository root)::

    pip download --no-deps scikit-learn==1.9.1 -d /tmp/skl
    python data/make_data.py /tmp/skl/scikit_learn-1.9.1-*.whl   # digits.npz + checkpoints
    python data/make_data.py --checkpoints-only                 # retrain from digits.npz

``SOURCE`` is a scikit-learn wheel (the file ``sklearn/datasets/data/digits.csv.gz``
is read from it) or that ``digits.csv.gz`` / ``digits.csv`` itself. Everything
is deterministic: the archive entries carry fixed timestamps, the training runs
on one thread with fixed seeds and deterministic algorithms. The checkpoints'
bytes can still differ across CPU instruction sets and torch versions; their
test accuracies are recorded in their metadata, and the tests recompute them.

Finally the sha256 of every written file is printed, for the README.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.datasets import stratified_holdout
from curvkit.models import digits_cnn, digits_mlp

HERE = Path(__file__).resolve().parent
CSV_IN_WHEEL = "sklearn/datasets/data/digits.csv.gz"
N_SAMPLES, N_FEATURES, PIXEL_MAX = 1797, 64, 16
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

CHECKPOINTS: dict[str, dict[str, Any]] = {
    "digits_mlp.pt": {
        "factory": "curvkit.models:digits_mlp",
        "kwargs": {"hidden": 32, "depth": 2, "activation": "tanh"},
        "lr": 3e-3,
        "epochs": 30,
    },
    "digits_cnn.pt": {
        "factory": "curvkit.models:digits_cnn",
        "kwargs": {"channels": 8, "pooled": 2},
        "lr": 1e-2,
        "epochs": 30,
    },
}
FACTORIES = {"curvkit.models:digits_mlp": digits_mlp, "curvkit.models:digits_cnn": digits_cnn}
BATCH_SIZE, SEED = 64, 0


def read_digits_csv(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``[1797, 64]`` and labels ``[1797]`` (uint8) from a wheel or the csv(.gz)."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = gzip.decompress(wheel.read(CSV_IN_WHEEL))
    elif source.suffix == ".gz":
        raw = gzip.decompress(source.read_bytes())
    else:
        raw = source.read_bytes()
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float64)
    if table.shape != (N_SAMPLES, N_FEATURES + 1):
        raise SystemExit(f"{source}: expected a {N_SAMPLES} x {N_FEATURES + 1} table, got {table.shape}")
    if not np.array_equal(table, np.round(table)) or table.min() < 0 or table[:, :-1].max() > PIXEL_MAX:
        raise SystemExit(f"{source}: expected integer pixels in 0..{PIXEL_MAX}")
    if set(np.unique(table[:, -1])) != set(range(10)):
        raise SystemExit(f"{source}: expected labels 0..9")
    return table[:, :-1].astype(np.uint8), table[:, -1].astype(np.uint8)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed``, but with fixed timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as :func:`curvkit.datasets.load_dataset` gives them: float32 in [0, 1], int64."""
    with np.load(path, allow_pickle=False) as npz:
        pixels, labels = npz["inputs"], npz["targets"]
    return torch.from_numpy(pixels.astype(np.float32)) / PIXEL_MAX, torch.from_numpy(labels.astype(np.int64))


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of samples whose largest logit is the target class."""
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).double().mean())


def train(name: str, spec: dict[str, Any], X: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Train one model with Adam on the training split; return the checkpoint dict."""
    test = stratified_holdout(y)
    X_train, y_train, X_test, y_test = X[~test], y[~test], X[test], y[test]
    torch.manual_seed(SEED)
    model = FACTORIES[spec["factory"]](**spec["kwargs"])
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    order = torch.Generator().manual_seed(SEED)
    steps = 0
    for _ in range(spec["epochs"]):
        for batch in torch.randperm(len(y_train), generator=order).split(BATCH_SIZE):
            loss = F.cross_entropy(model(X_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(X_train), y_train))
    test_accuracy = accuracy(model, X_test, y_test)
    recipe = {
        "data": "digits-train",
        "test_data": "digits-test",
        "optimizer": "Adam",
        "lr": spec["lr"],
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "batch_size": BATCH_SIZE,
        "epochs": spec["epochs"],
        "steps": steps,
        "seed": SEED,
        "init": f"torch.manual_seed({SEED}) before the factory; batches from randperm with its own seed",
        "train_loss": train_loss,
        "train_accuracy": accuracy(model, X_train, y_train),
        "torch": str(torch.__version__),
    }
    print(
        f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {steps} Adam steps, "
        f"train loss {train_loss:.4f}, train accuracy {recipe['train_accuracy']:.4f}, "
        f"test accuracy {test_accuracy:.4f} ({int(round(test_accuracy * len(y_test)))}/{len(y_test)})"
    )
    return {
        "curvkit": {
            "version": 1,
            "model_factory": spec["factory"],
            "model_kwargs": dict(spec["kwargs"]),
            "data": "digits",
            "loss": "cross_entropy",
            "train": recipe,
            "test_accuracy": test_accuracy,
        },
        "model_state_dict": model.state_dict(),
    }


def sha256(path: Path) -> str:
    """The sha256 of a file, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, write the files, print their sizes and checksums."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, help="scikit-learn wheel, or digits.csv(.gz)")
    parser.add_argument("--checkpoints-only", action="store_true", help="retrain from the existing npz")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    args = parser.parse_args(argv)
    if (args.source is None) != args.checkpoints_only:
        parser.error("give SOURCE, or --checkpoints-only (not both)")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    npz_path = args.out / "digits.npz"
    written = []
    if args.source is not None:
        pixels, labels = read_digits_csv(args.source)
        write_npz(npz_path, inputs=pixels, targets=labels)
        written.append(npz_path)
    X, y = load_npz(npz_path)
    for name, spec in CHECKPOINTS.items():
        torch.save(train(name, spec, X, y), args.out / name)
        written.append(args.out / name)
    for path in written:
        print(f"{sha256(path)}  {path.stat().st_size:>7} bytes  {path.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
