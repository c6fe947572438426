"""The bundled digits and checkpoints, data specifications, and their errors."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import re
import sys
import uuid
from importlib.resources import files
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import curvkit
from curvkit.datasets import (
    BUNDLED_PACKAGE,
    DatasetError,
    available_datasets,
    bundled_file,
    load_data_spec,
    load_dataset,
    stratified_holdout,
)
from curvkit.models import digits_cnn, digits_mlp

CHECKPOINTS = ("digits_mlp.pt", "digits_cnn.pt")
BUNDLED = ("digits.npz", *CHECKPOINTS)


def _readme_table() -> dict[str, tuple[int, str]]:
    """``file -> (bytes, sha256)`` from the table in the bundled README."""
    text = files(BUNDLED_PACKAGE).joinpath("README.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)` \| (\d+) \| `([0-9a-f]{64})` \|$", text, flags=re.M)
    return {name: (int(size), sha) for name, size, sha in rows}


def _one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ------------------------------------------------------------ bundled files
def test_the_bundled_files_are_package_resources_matching_the_readme():
    table = _readme_table()
    assert set(table) == set(BUNDLED)
    for name in BUNDLED:
        resource = files(BUNDLED_PACKAGE).joinpath(name)  # the installed package's files
        data = resource.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == table[name], name
        assert bundled_file(name).read_bytes() == data
    assert len(files(BUNDLED_PACKAGE).joinpath("digits.npz").read_bytes()) < 100_000
    assert all(len(bundled_file(name).read_bytes()) < 200_000 for name in CHECKPOINTS)


def test_bundled_file_names_the_files_when_asked_for_another():
    with pytest.raises(DatasetError) as excinfo:
        bundled_file("mnist.npz")
    _one_line_error(excinfo, "mnist.npz", "digits.npz", "digits_mlp.pt")


def test_the_raw_archive_holds_uint8_pixels_and_labels():
    with np.load(bundled_file("digits.npz"), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["inputs", "targets"]
        pixels, labels = npz["inputs"], npz["targets"]
    assert (pixels.shape, pixels.dtype, labels.shape, labels.dtype) == (
        (1797, 64),
        np.uint8,
        (1797,),
        np.uint8,
    )
    assert pixels.max() == 16 and labels.max() == 9
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # UCI's counts


def test_digits_shapes_dtypes_and_ranges():
    assert available_datasets() == ["digits", "digits-test", "digits-train"]
    X, y = load_dataset("digits")
    assert (X.shape, X.dtype, y.shape, y.dtype) == ((1797, 64), torch.float32, (1797,), torch.int64)
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert torch.equal(X * 16, (X * 16).round())  # counts 0..16, scaled exactly
    assert y.unique().tolist() == list(range(10))
    X[:] = -1  # a fresh copy each time
    assert float(load_dataset("digits")[0].min()) == 0.0


def test_the_split_is_a_stratified_partition():
    X, y = load_dataset("digits")
    test = stratified_holdout(y)
    X_train, y_train = load_dataset("digits-train")
    X_test, y_test = load_dataset("digits-test")
    assert (len(y_train), len(y_test)) == (1433, 364)
    assert torch.equal(X_test, X[test]) and torch.equal(y_train, y[~test])
    assert 35 <= int(y_test.bincount().min()) and int(y_test.bincount().max()) <= 37
    first = {int(c): int((y == c).nonzero()[0]) for c in range(10)}
    assert all(test[i] for i in first.values())  # each class's first sample is a test sample


def test_unknown_dataset_is_one_line_listing_the_names():
    with pytest.raises(DatasetError) as excinfo:
        load_dataset("mnist")
    _one_line_error(excinfo, "mnist", "digits, digits-test, digits-train")
    assert isinstance(excinfo.value, curvkit.CurvkitError) and isinstance(excinfo.value, curvkit.DataError)


def test_make_data_reproduces_the_archive_from_the_csv(tmp_path):
    make_data = importlib.import_module(f"{BUNDLED_PACKAGE}.make_data")
    with np.load(bundled_file("digits.npz"), allow_pickle=False) as npz:
        pixels, labels = npz["inputs"], npz["targets"]
    csv = tmp_path / "digits.csv.gz"  # scikit-learn's format: 64 pixels then the label, as floats
    with gzip.open(csv, "wt") as f:
        np.savetxt(f, np.hstack([pixels, labels[:, None]]).astype(np.float64), delimiter=",", fmt="%.18e")
    again = make_data.read_digits_csv(csv)
    assert np.array_equal(again[0], pixels) and np.array_equal(again[1], labels)
    make_data.write_npz(tmp_path / "digits.npz", inputs=again[0], targets=again[1])
    assert (tmp_path / "digits.npz").read_bytes() == bundled_file("digits.npz").read_bytes()


# ------------------------------------------------------------ checkpoints
def _rebuild(name: str) -> tuple[torch.nn.Module, dict]:
    checkpoint = torch.load(bundled_file(name), map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"curvkit", "model_state_dict"}
    meta = checkpoint["curvkit"]
    module_name, _, attr = meta["model_factory"].partition(":")
    model = getattr(importlib.import_module(module_name), attr)(**meta["model_kwargs"])
    model.load_state_dict(checkpoint["model_state_dict"])  # strict: every key fits
    return model.eval(), meta


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoints_rebuild_from_their_metadata_and_reach_their_accuracy(name):
    model, meta = _rebuild(name)
    assert meta["version"] == 1 and meta["data"] == "digits" and meta["loss"] == "cross_entropy"
    assert meta["model_factory"] == f"curvkit.models:{name.removesuffix('.pt')}"
    assert meta["train"]["data"] == "digits-train" and meta["train"]["optimizer"] == "Adam"
    X, y = load_dataset(meta["train"]["test_data"])
    with torch.no_grad():
        correct = int((model(X).argmax(dim=1) == y).sum())
    assert abs(correct - meta["test_accuracy"] * len(y)) <= 1  # within one sample on another CPU
    assert meta["test_accuracy"] > 0.95


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_hessian_of_the_bundled_problem_is_well_defined(name):
    model, meta = _rebuild(name)
    H = curvkit.curvature("hessian", curvkit.Problem(model, meta["loss"], load_data_spec(meta["data"])))
    V = torch.randn(H.shape[1], 2, generator=torch.Generator().manual_seed(0))
    HV = H @ V
    assert HV.shape == V.shape and bool(torch.isfinite(HV).all())
    assert float(V[:, 0] @ HV[:, 1]) == pytest.approx(float(V[:, 1] @ HV[:, 0]), rel=1e-3, abs=1e-5)


def test_retraining_the_mlp_reproduces_the_checkpoint():
    make_data = importlib.import_module(f"{BUNDLED_PACKAGE}.make_data")
    X, y = load_dataset("digits")
    fresh = make_data.train("digits_mlp.pt", make_data.CHECKPOINTS["digits_mlp.pt"], X, y)
    shipped = torch.load(bundled_file("digits_mlp.pt"), weights_only=True)
    assert fresh["curvkit"]["model_kwargs"] == shipped["curvkit"]["model_kwargs"]
    for key, value in shipped["model_state_dict"].items():
        torch.testing.assert_close(fresh["model_state_dict"][key], value, atol=1e-4, rtol=1e-3)


def test_model_factories_take_flat_digits_and_check_their_arguments():
    X = torch.rand(3, 64)
    assert digits_mlp(hidden=5, depth=3, activation="relu")(X).shape == (3, 10)
    assert digits_cnn(channels=2, pooled=1)(X).shape == (3, 10)
    for bad in (
        lambda: digits_mlp(hidden=0),
        lambda: digits_mlp(activation="swish"),
        lambda: digits_cnn(pooled=5),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match=r"^depth must be an integer >= 1, got 2.0$"):
        digits_mlp(depth=2.0)  # failed inside range() with a TypeError


def test_the_holdout_takes_an_integer_of_at_least_two():
    y = torch.tensor([0, 1, 0, 0, 1, 1, 1])
    assert torch.equal(stratified_holdout(y, every=np.int64(2)), stratified_holdout(y, every=2))
    for bad in (1, 2.0, True):  # 2.0 failed in the slicing with a TypeError
        with pytest.raises(ValueError, match=rf"^every must be an integer >= 2, got {bad}$"):
            stratified_holdout(y, every=bad)


# ------------------------------------------------------------ data specifications
_X = torch.rand(6, 4)
_Y = torch.tensor([0, 1, 2, 0, 1, 2])


def _write_pt(path: Path, obj) -> None:
    torch.save(obj, path)


def _write_npz(path: Path, x_key: str, y_key: str, X=_X, Y=_Y) -> None:
    np.savez(path, **{x_key: np.asarray(X), y_key: np.asarray(Y)})


def _write_h5(path: Path, x_key: str, y_key: str, X=_X, Y=_Y) -> None:
    with h5py.File(path, "w") as f:
        f[x_key] = np.asarray(X)
        f[y_key] = np.asarray(Y)


WRITERS = {
    "pt-inputs-targets": ("d.pt", lambda p: _write_pt(p, {"inputs": _X, "targets": _Y, "note": "x"})),
    "pt-X-y": ("d.pth", lambda p: _write_pt(p, {"X": _X, "y": _Y.to(torch.int32)})),
    "pt-tuple": ("d.pt", lambda p: _write_pt(p, (_X, _Y))),
    "npz-X-y": ("d.npz", lambda p: _write_npz(p, "X", "y")),
    "npz-inputs-targets": (
        "d.npz",
        lambda p: _write_npz(p, "inputs", "targets", Y=_Y.numpy().astype(np.uint8)),
    ),
    "h5-X-y": ("d.h5", lambda p: _write_h5(p, "X", "y")),
    "h5-inputs-targets": ("d.hdf5", lambda p: _write_h5(p, "inputs", "targets")),
}


@pytest.mark.parametrize("form", WRITERS)
def test_files_of_every_accepted_form_load(tmp_path, form):
    filename, write = WRITERS[form]
    path = tmp_path / filename
    write(path)
    for spec in (str(path), path):
        X, y = load_data_spec(spec)
        assert torch.equal(X, _X) and torch.equal(y, _Y) and y.dtype == torch.int64


def test_bundled_names_load_through_the_spec():
    X, y = load_data_spec("digits-test")
    assert torch.equal(X, load_dataset("digits-test")[0]) and torch.equal(y, load_dataset("digits-test")[1])


def test_float_targets_and_dict_inputs_are_accepted(tmp_path):
    path = tmp_path / "reg.pt"
    torch.save({"inputs": {"a": _X, "b": _X[:, :2]}, "targets": torch.rand(6, 3, dtype=torch.float64)}, path)
    X, y = load_data_spec(path)
    assert set(X) == {"a", "b"} and y.dtype == torch.float64  # for an mse loss


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A fresh importable module ``name`` in ``tmp_path``; yields a writer of its source."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(source: str) -> str:
        name = f"curvkit_data_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


MODULE = """
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

X, Y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])

def pair():
    return X, Y

def arrays():
    return {"X": X.numpy(), "y": Y.numpy()}

def dataset():
    return TensorDataset(X, Y)

def loader():
    return DataLoader(TensorDataset(X, Y), batch_size=4)

class Factory:
    @staticmethod
    def make():
        return [X, Y]

DATASET = TensorDataset(X, Y)

def fails():
    raise RuntimeError("no network\\nsecond line")

def wrong():
    return 42

def mismatched():
    return X, Y[:5]
"""


def test_module_functions_give_pairs_datasets_and_loaders(module_dir):
    name = module_dir(MODULE)
    module = importlib.import_module(name)
    for attr in ("pair", "arrays", "Factory.make"):
        X, y = load_data_spec(f"{name}:{attr}")
        assert torch.equal(X, module.X) and torch.equal(y, module.Y) and y.dtype == torch.int64
    assert isinstance(load_data_spec(f"{name}:dataset"), TensorDataset)
    assert isinstance(load_data_spec(f"{name}:loader"), DataLoader)
    assert load_data_spec(f"{name}:DATASET") is module.DATASET
    model = torch.nn.Linear(4, 3)
    for attr in ("pair", "dataset", "loader"):  # each is data a Problem accepts
        problem = curvkit.Problem(model, "cross_entropy", load_data_spec(f"{name}:{attr}"))
        assert bool(torch.isfinite(curvkit.curvature("hessian", problem) @ torch.ones(problem.dim)).all())


@pytest.mark.parametrize(
    ("attr", "words"),
    [
        ("missing", ["has no attribute 'missing'"]),
        ("fails", ["fails() raised RuntimeError: no network"]),
        ("wrong", ["returned a int", "Dataset, a DataLoader or (X, y)"]),
        ("mismatched", ["6 samples but targets have 5"]),
    ],
)
def test_module_function_errors_are_one_line(module_dir, attr, words):
    name = module_dir(MODULE)
    with pytest.raises(DatasetError) as excinfo:
        load_data_spec(f"{name}:{attr}")
    _one_line_error(excinfo, *words)


def test_an_unimportable_module_is_one_line():
    with pytest.raises(DatasetError) as excinfo:
        load_data_spec("no_such_module_for_curvkit:make")
    _one_line_error(
        excinfo, "data 'no_such_module_for_curvkit:make'", "cannot import module", "ModuleNotFoundError"
    )


def _truncated_pt(path: Path) -> None:
    torch.save({"inputs": _X, "targets": _Y}, path)
    path.write_bytes(path.read_bytes()[:200])


BAD_FILES = {
    "missing-pt": ("gone.pt", None, ["data file not found", "gone.pt"]),
    "missing-h5": ("gone.h5", None, ["data file not found"]),
    "unknown-suffix": ("d.csv", lambda p: p.write_text("1,2\n"), ["unknown file type .csv", ".npz"]),
    "corrupt-pt": (
        "d.pt",
        lambda p: p.write_bytes(b"\x00garbage" * 20),
        ["cannot read", "not a torch.save file"],
    ),
    "truncated-pt": ("d.pt", _truncated_pt, ["cannot read", "truncated or corrupt"]),
    "pickled-module-pt": (
        "d.pt",
        lambda p: _write_pt(p, torch.nn.Linear(2, 2)),
        ["weights_only=True", "pickled torch.nn.modules.linear.Linear"],
    ),
    "pt-wrong-keys": ("d.pt", lambda p: _write_pt(p, {"features": _X, "labels": _Y}), ["features, labels"]),
    "pt-triple": ("d.pt", lambda p: _write_pt(p, (_X, _Y, _Y)), ["tuple of length 3"]),
    "pt-shapes": ("d.pt", lambda p: _write_pt(p, {"X": _X[:5], "y": _Y}), ["5 samples but targets have 6"]),
    "pt-nan": (
        "d.pt",
        lambda p: _write_pt(p, {"X": _X.index_fill(0, torch.tensor([2]), float("nan")), "y": _Y}),
        ["4 NaN or Inf"],
    ),
    "pt-inf-targets": (
        "d.pt",
        lambda p: _write_pt(p, (_X, torch.full((6,), float("inf")))),
        ["targets contains 6 NaN or Inf"],
    ),
    "pt-bool-targets": ("d.pt", lambda p: _write_pt(p, (_X, _Y > 0)), ["unsupported dtype torch.bool"]),
    "pt-empty": ("d.pt", lambda p: _write_pt(p, (_X[:0], _Y[:0])), ["no samples"]),
    "pt-scalar": ("d.pt", lambda p: _write_pt(p, (_X, torch.tensor(1))), ["scalar"]),
    "pt-dict-inputs": (
        "d.pt",
        lambda p: _write_pt(p, {"inputs": {"a": _X[:2]}, "targets": _Y}),
        ["inputs['a'] has 2 samples"],
    ),
    "corrupt-npz": ("d.npz", lambda p: p.write_bytes(b"PK\x03\x04broken"), ["cannot read"]),
    "npz-wrong-keys": ("d.npz", lambda p: np.savez(p, a=np.zeros(3)), ["found keys: a"]),
    "npz-object": (
        "d.npz",
        lambda p: np.savez(p, X=np.array([{}], dtype=object), y=np.zeros(1)),
        ["cannot read"],
    ),
    "npz-strings": (
        "d.npz",
        lambda p: np.savez(p, X=np.array(["a", "b"]), y=np.zeros(2)),
        ["unsupported dtype <U1"],
    ),
    "h5-not-hdf5": ("d.h5", lambda p: p.write_text("not hdf5"), ["cannot read"]),
    "h5-wrong-keys": ("d.h5", lambda p: _write_h5(p, "features", "labels"), ["found: features, labels"]),
    "h5-shapes": ("d.h5", lambda p: _write_h5(p, "X", "y", Y=_Y[:4]), ["6 samples but targets have 4"]),
    "folder": ("d.npz", lambda p: p.mkdir(), ["not a file"]),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_give_one_line_errors(tmp_path, case):
    filename, write, words = BAD_FILES[case]
    path = tmp_path / filename
    if write is not None:
        write(path)
    with pytest.raises(DatasetError) as excinfo:
        load_data_spec(path)
    _one_line_error(excinfo, *words)


@pytest.mark.parametrize("spec", ["mnist", "my data", "not/a/file"])
def test_unrecognised_specs_list_what_is_accepted(spec):
    with pytest.raises(DatasetError) as excinfo:
        load_data_spec(spec)
    _one_line_error(
        excinfo, repr(spec), "digits, digits-test, digits-train", ".pt/.pth/.npz/.h5/.hdf5", "module:function"
    )
