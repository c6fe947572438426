"""Checkpoints: every format, GPU-saved files on a CPU machine, bad input, the loader hook.

GPU-saved files are made here, on a CPU-only machine, by recording the device
the way a GPU machine would: ``torch.save`` under a patched
``torch.serialization.location_tag`` (every storage is tagged ``cuda:0``);
TorchScript archives by rewriting the location strings of their pickles;
``torch.export`` archives by rewriting the devices in their JSON records and
re-saving their pickled sample inputs under the patched tag. Each test first
checks that torch itself refuses the file without a map location.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickletools
import struct
import sys
import textwrap
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch
from torch import nn

import curvkit
from curvkit.checkpoints import (
    BUILTIN_LOADERS,
    WEIGHTS_KEYS,
    CheckpointError,
    CheckpointLoader,
    LoadedCheckpoint,
    ScriptModuleAdapter,
    checkpoint_formats,
    find_checkpoints,
    is_checkpoint,
    load_checkpoint,
    read_safetensors,
    resolve_factory,
    save_checkpoint,
)
from curvkit.errors import DataError, PluginError

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning"
    ),  # deepcopy
]

DT = torch.float64
MODELS = "curvkit_test_checkpoint_models"  # an importable module written by the fixture below

MODELS_SOURCE = '''
import torch
from torch import nn

from curvkit.checkpoints import trusted_factory


class MLP(nn.Module):
    """3 -> hidden -> 2 with tanh; an nn.Module subclass, so checkpoints may name it."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)


class Zoo:
    small = MLP


def make_mlp(hidden: int = 4):
    return MLP(hidden)


@trusted_factory
def make_trusted_mlp(hidden: int = 4):
    return MLP(hidden)


class Shifted(nn.Module):
    """Creates a tensor in forward: torch.export bakes its device (and dtype) into the graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) + torch.ones(2, dtype=x.dtype)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.bn(self.fc(x)))))
'''


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Iterator[types.ModuleType]:
    folder = tmp_path_factory.mktemp("models")
    (folder / f"{MODELS}.py").write_text(textwrap.dedent(MODELS_SOURCE))
    sys.path.insert(0, str(folder))
    try:
        yield __import__(MODELS)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODELS, None)


def _mlp(models, hidden: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.MLP(hidden)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


def _assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 600, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@contextlib.contextmanager
def cuda_tagged() -> Iterator[None]:
    """``torch.save`` records every storage as living on ``cuda:0``, as on a GPU machine."""
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        yield


def _refused_without_map_location(load) -> None:
    """torch itself cannot load the file on this machine: it is genuinely CUDA-tagged."""
    if torch.cuda.is_available():
        return
    with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda"):
        load()


def _retag_pickle(data: bytes) -> bytes:
    """A TorchScript pickle with every ``"cpu"`` location string replaced by ``"cuda:0"``.

    Pickle opcodes refer to each other by memo index, never by byte offset, so
    replacing one string opcode keeps the rest valid.
    """
    out, last = bytearray(), 0
    ops = list(pickletools.genops(data))
    assert not any(op.name == "FRAME" for op, _, _ in ops)
    for (op, arg, pos), nxt in zip(ops, [*ops[1:], (None, None, len(data))]):
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE") and arg == "cpu":
            new = b"cuda:0"
            out += data[last:pos] + b"X" + struct.pack("<I", len(new)) + new
            last = nxt[2]
    return bytes(out + data[last:])


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            rel = info.filename.split("/", 1)[1]
            zo.writestr(info.filename, edit(rel, zi.read(info)))


def _cuda_devices(obj):
    if isinstance(obj, dict):
        if set(obj) == {"type", "index"}:
            return {"type": "cuda", "index": 0}
        return {k: _cuda_devices(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cuda_devices(v) for v in obj]
    return obj


def _cuda_export_archive(src: Path, dst: Path) -> None:
    """The archive a GPU machine writes: every Device in the JSON is cuda:0, pickles tagged cuda:0."""

    def edit(rel: str, data: bytes) -> bytes:
        if rel.endswith(".json"):
            return json.dumps(_cuda_devices(json.loads(data))).encode()
        if rel.startswith("data/sample_inputs/"):
            obj = torch.load(io.BytesIO(data), weights_only=True)
            buf = io.BytesIO()
            with cuda_tagged():
                torch.save(obj, buf)
            return buf.getvalue()
        return data

    _rewrite_zip(src, dst, edit)
    with zipfile.ZipFile(dst) as zf:
        assert any(b'"type": "cuda"' in zf.read(n) for n in zf.namelist() if n.endswith("models/model.json"))


def _export(model: nn.Module, x: torch.Tensor, dynamic: bool = True):
    dims = ({0: torch.export.Dim("batch")},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,), dynamic_shapes=dims)


@pytest.fixture(scope="module")
def f64_mlp(models) -> nn.Module:
    return _mlp(models, hidden=5, seed=1).to(DT).eval()


@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory, f64_mlp) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.export.save(_export(f64_mlp, torch.randn(4, 3, dtype=DT)), path)
    return path


@pytest.fixture(scope="module")
def script_file(tmp_path_factory, f64_mlp) -> Path:
    path = tmp_path_factory.mktemp("ts") / "mlp_script.pt"
    torch.jit.save(torch.jit.script(f64_mlp), path)
    return path


# --------------------------------------------------------------------------- the curvkit convention
def test_save_and_load_roundtrip(tmp_path, models):
    net = _mlp(models, hidden=6)
    path = save_checkpoint(
        tmp_path / "ckpt.pt",
        net,
        model_factory=f"{MODELS}:MLP",
        model_kwargs={"hidden": 6},
        data="digits",
        loss="cross_entropy",
        epoch=3,
        tags=["a", "b"],
    )
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["curvkit"] == {
        "version": 1,
        "model_factory": f"{MODELS}:MLP",
        "model_kwargs": {"hidden": 6},
        "data": "digits",
        "loss": "cross_entropy",
        "epoch": 3,
        "tags": ["a", "b"],
    }
    loaded = load_checkpoint(path)  # no model given: it comes from the metadata
    assert isinstance(loaded, LoadedCheckpoint)
    assert loaded.format == "curvkit" and loaded.metadata == raw["curvkit"]
    assert loaded.info == {"epoch": 3, "tags": ["a", "b"]}  # the extras, as a top-level epoch would be
    assert isinstance(loaded.model, models.MLP) and not loaded.model.training
    _assert_same_weights(loaded.model, net)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.missing == [] and loaded.unexpected == [] and loaded.path == path
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_unwraps_data_parallel_and_compile(tmp_path, models):
    net = _mlp(models)
    for wrapped in (nn.DataParallel(net), torch.compile(net)):
        path = save_checkpoint(tmp_path / "w.pt", wrapped, model_factory=f"{MODELS}:MLP")
        keys = list(torch.load(path, weights_only=True)["model_state_dict"])
        assert keys == list(net.state_dict())


@pytest.mark.parametrize("saved", ["uncompiled", "compiled"])
def test_a_compiled_model_gets_the_weights_of_its_original_module(tmp_path, models, saved):
    """A factory returning ``torch.compile(net)`` (``curvkit analyze --model mod:compiled``): its keys
    are ``_orig_mod.*``, so a checkpoint of the uncompiled model fitted none of them ("6 missing
    keys ... 6 unexpected keys"); the weights now go to the original module, whatever the keys."""
    net = _mlp(models, seed=1)
    state = net.state_dict() if saved == "uncompiled" else _prefixed(net, "_orig_mod.")
    path = tmp_path / "w.pt"
    torch.save(state, path)
    fresh = _mlp(models, seed=2)
    loaded = load_checkpoint(path, model_factory=lambda: torch.compile(fresh))
    assert loaded.model._orig_mod is fresh and loaded.missing == [] and loaded.unexpected == []
    _assert_same_weights(fresh, net)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"model_factory": "__main__:MLP"}, "running script"),
        ({"model_factory": "no colon"}, "'module:attribute'"),
        ({"model_factory": "m:MLP", "model_kwargs": {"act": nn.Tanh()}}, "model_kwargs['act'] is a torch.nn"),
        ({"model_factory": "m:MLP", "model_kwargs": {1: 2}}, "not a str"),
        ({"model_factory": "m:MLP", "lr": torch.tensor(0.1)}, "lr is a torch.Tensor"),
        ({"model_factory": "m:MLP", "loss": nn.MSELoss()}, "loss must be a str"),
        ({"model_factory": "m:MLP", "version": 2}, "reserved"),
    ],
)
def test_save_refuses_bad_metadata(tmp_path, models, kwargs, fragment):
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(tmp_path / "x.pt", _mlp(models), **kwargs)
    _assert_one_line(exc, fragment)
    assert not (tmp_path / "x.pt").exists()


def test_save_to_an_unwritable_place(tmp_path, models):
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(tmp_path / "no" / "such" / "dir.pt", _mlp(models), model_factory=f"{MODELS}:MLP")
    _assert_one_line(exc, "cannot write checkpoint", "writable")


# --------------------------------------------------------------------------- factories
def test_resolve_factory(models):
    assert resolve_factory(f"{MODELS}:MLP") is models.MLP
    assert resolve_factory(f"{MODELS}:Zoo.small") is models.MLP  # dotted attribute
    for spec, fragment in [
        ("nomodule_xyz:f", "cannot import module 'nomodule_xyz'"),
        (f"{MODELS}:MPL", "did you mean 'MLP'"),
        (f"{MODELS}:Zoo.big", "no attribute 'big'"),
        ("torch:__version__", "not a class or function"),
        ("torch.nn.Linear", "'module:attribute'"),
        ("torch:1bad", "dotted Python names"),
    ]:
        with pytest.raises(CheckpointError) as exc:
            resolve_factory(spec)
        _assert_one_line(exc, fragment)


def test_model_sources_in_order(tmp_path, models):
    net = _mlp(models, hidden=3)
    path = tmp_path / "sd.pt"
    torch.save(net.state_dict(), path)
    given = models.MLP(3)
    assert load_checkpoint(path, model=given).model is given  # loaded in place
    _assert_same_weights(given, net)
    by_spec = load_checkpoint(path, model_factory=f"{MODELS}:make_mlp", model_kwargs={"hidden": 3})
    _assert_same_weights(by_spec.model, net)
    by_callable = load_checkpoint(path, model_factory=lambda: models.MLP(3))
    _assert_same_weights(by_callable.model, net)


def test_metadata_factories_must_be_trusted(tmp_path, models):
    """A file may name nn.Module classes and @trusted_factory functions; other callables need consent."""
    net = _mlp(models, hidden=3)
    for factory in ("MLP", "make_trusted_mlp"):
        path = save_checkpoint(
            tmp_path / "a.pt", net, model_factory=f"{MODELS}:{factory}", model_kwargs={"hidden": 3}
        )
        _assert_same_weights(load_checkpoint(path).model, net)
    path = save_checkpoint(
        tmp_path / "b.pt", net, model_factory=f"{MODELS}:make_mlp", model_kwargs={"hidden": 3}
    )
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, f"--model {MODELS}:make_mlp", "arbitrary code")
    confirmed = load_checkpoint(path, model_factory=f"{MODELS}:make_mlp")  # kwargs from the metadata
    _assert_same_weights(confirmed.model, net)
    _assert_same_weights(load_checkpoint(path, trust_pickle=True).model, net)


def test_a_failing_factory(tmp_path, models):
    path = save_checkpoint(
        tmp_path / "a.pt", _mlp(models), model_factory=f"{MODELS}:MLP", model_kwargs={"width": 3}
    )
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, f"{MODELS}:MLP(**{{'width': 3}}) failed", "TypeError", "--model-kwargs")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=lambda: "not a module")
    _assert_one_line(exc, "not a torch.nn.Module")


# --------------------------------------------------------------------------- formats
def _tutorial(net, opt_state=True):
    ckpt = {"epoch": 7, "model_state_dict": net.state_dict(), "loss": 0.25}
    if opt_state:
        opt = torch.optim.Adam(net.parameters())
        net(torch.randn(2, 3)).sum().backward()
        opt.step()
        ckpt["optimizer_state_dict"] = opt.state_dict()
    return ckpt


def _prefixed(net, prefix):
    return {prefix + k: v for k, v in net.state_dict().items()}


def _nested_compile(net):
    return {k.replace("net.", "module.net._orig_mod.", 1): v for k, v in net.state_dict().items()}


def _lightning(net):
    return {
        "epoch": 4,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {**_prefixed(net, "model."), "loss_fn.pos_weight": torch.ones(2)},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1, 2, 3]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"hidden": 4, "lr": 0.01},
    }


FORMATS = {
    "state_dict": lambda net: net.state_dict(),
    "tutorial": _tutorial,
    "checkpoint-dict": lambda net: {"state_dict": net.state_dict(), "step": 3},
    "ddp": lambda net: _prefixed(net, "module."),
    "compile": lambda net: _prefixed(net, "_orig_mod."),
    "ddp-of-compile": _nested_compile,
    "lightning": _lightning,
}
KIND = {"ddp": "state_dict", "compile": "state_dict", "ddp-of-compile": "state_dict"}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-saved", "cuda-saved"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_torch_save_formats(tmp_path, models, name, cuda, legacy):
    net = _mlp(models)
    path = tmp_path / ("model.ckpt" if name == "lightning" else "model.pt")
    with cuda_tagged() if cuda else contextlib.nullcontext():
        torch.save(FORMATS[name](net), path, _use_new_zipfile_serialization=not legacy)
    if cuda:
        _refused_without_map_location(lambda: torch.load(path, weights_only=True))
    factory = {"model_factory": f"{MODELS}:MLP"}
    loaded = load_checkpoint(path, **factory)  # lightning: hidden=4 comes from hyper_parameters
    assert loaded.format == KIND.get(name, name)
    _assert_same_weights(loaded.model, net)
    assert all(t.device.type == "cpu" for t in loaded.model.state_dict().values())
    if name == "lightning":
        assert loaded.info["epoch"] == 4 and loaded.info["global_step"] == 120
        assert loaded.info["hyper_parameters"] == {"hidden": 4, "lr": 0.01}
        assert any("'model.'" in n for n in loaded.notes) and any(
            "loss_fn.pos_weight" in n for n in loaded.notes
        )
    if name == "tutorial":
        assert loaded.info == {"epoch": 7, "loss": 0.25}
    if name in ("ddp", "ddp-of-compile"):
        assert any("module." in n for n in loaded.notes)


def test_lightning_hyper_parameters_are_filtered_to_the_factory(tmp_path, models):
    net = _mlp(models, hidden=7)
    ckpt = _lightning(net)
    ckpt["hyper_parameters"] = {"hidden": 7, "lr": 0.1, "weight_decay": 0.0}
    torch.save(ckpt, tmp_path / "l.ckpt")
    loaded = load_checkpoint(tmp_path / "l.ckpt", model_factory=f"{MODELS}:MLP")
    _assert_same_weights(loaded.model, net)
    assert (
        "model kwargs from the Lightning hyper_parameters: hidden" in loaded.notes
    )  # lr, weight_decay dropped
    assert loaded.info["hyper_parameters"] == {"hidden": 7, "lr": 0.1, "weight_decay": 0.0}


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-saved", "cuda-saved"])
def test_pickled_module_needs_trust(tmp_path, models, cuda):
    net = _mlp(models)
    path = tmp_path / "whole.pt"
    with cuda_tagged() if cuda else contextlib.nullcontext():
        torch.save(net, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, "execute arbitrary code", "--trust-pickle", f"{MODELS}.MLP")
    loaded = load_checkpoint(path, trust_pickle=True)
    assert loaded.format == "pickled-module" and isinstance(loaded.model, models.MLP)
    _assert_same_weights(loaded.model, net)
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_safetensors_dtypes_the_old_reader_lacked(tmp_path):
    tensors = {
        "i8": torch.tensor([-3, 0, 5], dtype=torch.int8),
        "bf16": torch.randn(5).bfloat16(),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([7, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([2**63], dtype=torch.uint64),
        "f8e4m3": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
        "f8e5m2": torch.tensor([0.25, 4.0]).to(torch.float8_e5m2),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "all.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    read, meta = read_safetensors(path)
    assert meta == {"format": "pt"} and sorted(read) == sorted(tensors)
    for k, t in tensors.items():
        got = read[k]
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), k


def test_safetensors_checkpoint(tmp_path, models):
    net = _mlp(models)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(net.state_dict(), path)
    loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    assert loaded.format == "safetensors"
    _assert_same_weights(loaded.model, net)
    # the curvkit metadata convention, as a JSON string in __metadata__; any file name
    meta = {"version": 1, "model_factory": f"{MODELS}:MLP", "model_kwargs": {"hidden": 4}, "step": 40}
    other = tmp_path / "weights.bin2"
    safetensors_torch.save_file(net.state_dict(), other, metadata={"curvkit": json.dumps(meta)})
    loaded = load_checkpoint(other)
    assert loaded.format == "safetensors" and loaded.metadata == meta and loaded.info == {"step": 40}


def test_safetensors_without_the_package(tmp_path, models, monkeypatch):
    path = tmp_path / "model.bin"  # recognised by its header, not its suffix
    safetensors_torch.save_file(_mlp(models).state_dict(), path)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError):
        import safetensors  # noqa: F401
    assert is_checkpoint(path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    _assert_one_line(exc, "model.bin is a safetensors file", 'pip install "curvkit[safetensors]"')


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-saved", "cuda-saved"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript(tmp_path, f64_mlp, how, cuda):
    x = torch.randn(6, 3, dtype=DT)
    scripted = torch.jit.script(f64_mlp) if how == "script" else torch.jit.trace(f64_mlp, x)
    path = tmp_path / "ts.pt"
    torch.jit.save(scripted, path)
    if cuda:
        cpu_path, path = path, tmp_path / "ts_cuda.pt"
        _rewrite_zip(cpu_path, path, lambda rel, d: _retag_pickle(d) if rel.endswith(".pkl") else d)
        _refused_without_map_location(lambda: torch.jit.load(str(path)))
    loaded = load_checkpoint(path)
    assert loaded.format == "torchscript" and isinstance(loaded.model, ScriptModuleAdapter)
    assert [n for n, _ in loaded.model.named_parameters()] == [n for n, _ in f64_mlp.named_parameters()]
    _assert_same_weights(loaded.model, f64_mlp)
    assert all(p.device.type == "cpu" for p in loaded.model.scripted.parameters())
    torch.testing.assert_close(loaded.model(x), f64_mlp(x))
    # the model= argument is not used for self-contained formats
    assert (
        load_checkpoint(path, model=nn.Linear(1, 1))
        .notes[-1]
        .startswith("the checkpoint holds its own model")
    )


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-saved", "cuda-saved"])
def test_torch_export(tmp_path, pt2_file, f64_mlp, cuda):
    path = pt2_file
    if cuda:
        path = tmp_path / "cuda.pt2"
        _cuda_export_archive(pt2_file, path)
        _refused_without_map_location(lambda: torch.export.load(path))
    loaded = load_checkpoint(path)
    assert loaded.format == "torch.export"
    assert [n for n, _ in loaded.model.named_parameters()] == [n for n, _ in f64_mlp.named_parameters()]
    _assert_same_weights(loaded.model, f64_mlp)
    assert all(t.device.type == "cpu" for t in loaded.model.state_dict().values())
    x = torch.randn(7, 3, dtype=DT)  # another batch size: the batch dimension was exported dynamic
    torch.testing.assert_close(loaded.model(x), f64_mlp(x))
    loaded.model.train()  # ordinary train()/eval() again (torch's module() makes them raise)
    loaded.model.eval()


def test_cuda_saved_export_with_device_arguments(tmp_path, models):
    """A graph op with device=cuda:0 (as a GPU machine writes) runs on the CPU."""
    torch.manual_seed(0)
    net = models.Shifted().to(DT)
    cpu_path, path = tmp_path / "shifted.pt2", tmp_path / "shifted_cuda.pt2"
    torch.export.save(_export(net, torch.randn(4, 3, dtype=DT)), cpu_path)
    _cuda_export_archive(cpu_path, path)
    with zipfile.ZipFile(path) as zf:
        graph = json.loads(zf.read("shifted/models/model.json"))
    assert '"as_device": {"type": "cuda", "index": 0}' in json.dumps(graph)
    loaded = load_checkpoint(path)
    x = torch.randn(5, 3, dtype=DT)
    torch.testing.assert_close(loaded.model(x), net(x))


def test_torch_export_in_training_mode_is_evaluated(tmp_path, models):
    torch.manual_seed(0)
    net = models.BNNet()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    net.train()
    path = tmp_path / "train.pt2"
    torch.export.save(_export(net, torch.randn(8, 3)), path)
    loaded = load_checkpoint(path)
    assert any("training mode" in n for n in loaded.notes)
    x = torch.randn(5, 3)
    before = loaded.model.state_dict()
    torch.testing.assert_close(loaded.model(x), net.eval()(x))  # running statistics, no dropout
    torch.testing.assert_close(loaded.model(x), loaded.model(x))
    for k, v in loaded.model.state_dict().items():  # num_batches_tracked is not incremented
        assert torch.equal(v, before[k]), k


def test_torch_export_static_shapes_fail_clearly(tmp_path, f64_mlp):
    path = tmp_path / "static.pt2"
    torch.export.save(_export(f64_mlp, torch.randn(4, 3, dtype=DT), dynamic=False), path)
    loaded = load_checkpoint(path)
    assert any("static batch dimension" in n and "(4, 3)" in n for n in loaded.notes)
    x = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(loaded.model(x), f64_mlp(x))
    with pytest.raises(DataError, match=r"takes inputs of shape \(4, 3\).*got \(2, 3\).*Dim\('batch'\)"):
        loaded.model(torch.randn(2, 3, dtype=DT))
    X, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    problem = curvkit.Problem(loaded.model, "mse", (X, y), batch_size=4)  # last batch has 2 samples
    with pytest.raises(DataError, match="re-export with dynamic_shapes"):
        curvkit.curvature("hessian", problem) @ torch.ones(problem.dim, dtype=DT)


# --------------------------------------------------------------------------- curvkit runs the archives
@pytest.mark.parametrize("strategy", ["reverse", "batched-reverse", "forward-over-reverse"])
def test_self_contained_models_run_under_torch_func(pt2_file, script_file, f64_mlp, strategy):
    """functional_call works on the loaded TorchScript and torch.export models; HVPs match eager."""
    torch.manual_seed(3)
    X, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)
    reference = curvkit.curvature(
        "hessian", curvkit.Problem(f64_mlp, "mse", (X, y), batch_size=4), strategy=strategy
    )
    V = torch.randn(reference.shape[1], 3, dtype=DT)
    expected = reference.matmat(V)
    with pytest.raises(RuntimeError, match="Jitted"):  # why the adapter exists
        torch.func.functional_call(torch.jit.load(str(script_file)), {}, (X,))
    for path in (script_file, pt2_file):
        model = load_checkpoint(path).model
        problem = curvkit.Problem(model, "mse", (X, y), batch_size=4)
        H = curvkit.curvature("hessian", problem, strategy=strategy)
        for _ in range(2):  # the TorchScript executor optimises after its first runs
            torch.testing.assert_close(H.matmat(V), expected, rtol=1e-10, atol=1e-12)
        H32 = curvkit.curvature("hessian", problem.to(torch.float32), strategy=strategy)
        torch.testing.assert_close(H32.matmat(V.float()), expected.float(), rtol=1e-4, atol=1e-5)


def test_script_adapter_modes_and_tied_weights(tmp_path, models):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.drop = nn.Dropout(0.9)

        def forward(self, x):
            return self.drop(self.b(torch.tanh(self.a(x))))

    torch.manual_seed(0)
    net = Tied().eval()
    path = tmp_path / "tied.pt"
    torch.jit.save(torch.jit.script(net), path)
    model = load_checkpoint(path).model
    assert model.a.weight is model.b.weight
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), net(x))
    model.train()
    assert (model(x) == 0).float().mean() > 0.5  # the scripted module follows the adapter's mode
    model.eval()
    # gradients reach both uses of the tied weight
    w = {"a.weight": model.a.weight.detach().clone().requires_grad_()}
    g = torch.autograd.grad(torch.func.functional_call(model, w, (x,)).sum(), w["a.weight"])[0]
    w_ref = net.a.weight.detach().clone().requires_grad_()
    g_ref = torch.autograd.grad(torch.func.functional_call(net, {"a.weight": w_ref}, (x,)).sum(), w_ref)[0]
    torch.testing.assert_close(g, g_ref)


# --------------------------------------------------------------------------- training dicts, strictness
def _optimizer_state(net) -> dict:
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


def test_a_resemblyzer_like_training_dict(tmp_path, models):
    """Resemblyzer's pretrained.pt: old non-zip format, saved on CUDA, weights under 'model_state'
    together with two loss parameters the model does not have."""
    net = _mlp(models)
    state = {
        **net.state_dict(),
        "similarity_weight": torch.tensor([10.0]),
        "similarity_bias": torch.tensor([-5.0]),
    }
    path = tmp_path / "pretrained.pt"
    with cuda_tagged():
        torch.save(
            {"step": 100, "model_state": state, "optimizer_state": _optimizer_state(_mlp(models))},
            path,
            _use_new_zipfile_serialization=False,
        )
    assert not zipfile.is_zipfile(path)
    _refused_without_map_location(lambda: torch.load(path, weights_only=True))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    msg = _assert_one_line(exc, "2 unexpected keys (similarity_weight, similarity_bias)", "--no-strict")
    assert "missing" not in msg and "shape" not in msg
    loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP", strict=False)
    _assert_same_weights(loaded.model, net)
    assert loaded.format == "checkpoint-dict" and loaded.weights_key == "model_state"
    assert loaded.info == {"step": 100} and loaded.missing == []
    assert loaded.unexpected == ["similarity_weight", "similarity_bias"]
    assert loaded.ignored_summary == (
        "ignored 2 checkpoint entries the model does not have: similarity_weight, similarity_bias"
    )


def test_strictness_messages_and_summary(tmp_path, models):
    path = tmp_path / "sd.pt"
    state = _mlp(models).state_dict()
    del state["net.2.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    _assert_one_line(
        exc, "1 missing key (net.2.bias)", "--no-strict (strict=False) to keep the model's initial"
    )
    loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP", strict=False)
    assert (
        loaded.ignored_summary
        == "kept the model's initial values for 1 entry the checkpoint lacks: net.2.bias"
    )
    assert load_checkpoint(
        path, model_factory=f"{MODELS}:MLP", model_kwargs={"hidden": 4}, strict=False
    ).missing
    torch.save(_mlp(models).state_dict(), path)
    assert load_checkpoint(path, model_factory=f"{MODELS}:MLP").ignored_summary == ""
    # shape mismatches are not a matter of strictness
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP", model_kwargs={"hidden": 5}, strict=False)
    assert "--no-strict" not in _assert_one_line(exc, "shape mismatches", "--model-kwargs")


USUAL_WEIGHTS_KEYS = (  # what training scripts in the wild save the weights under
    *("model_state_dict", "state_dict", "model_state", "model", "net", "network", "module"),
    *("weights", "params", "ema", "ema_state_dict", "ema_model", "model_ema", "state_dict_ema", "params_ema"),
)


def test_the_usual_weights_keys_are_listed():
    assert sorted(WEIGHTS_KEYS) == sorted(USUAL_WEIGHTS_KEYS)


@pytest.mark.parametrize("key", USUAL_WEIGHTS_KEYS)
def test_the_usual_weights_keys(tmp_path, models, key):
    net = _mlp(models)
    path = tmp_path / "train.pt"
    torch.save({key: net.state_dict(), "epoch": 2, "optimizer": _optimizer_state(_mlp(models))}, path)
    loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    _assert_same_weights(loaded.model, net)
    assert loaded.weights_key == key and loaded.info == {"epoch": 2} and loaded.notes == []


def test_weights_one_level_down_or_under_any_single_key(tmp_path, models):
    net = _mlp(models)
    path = tmp_path / "train.pt"
    for obj, key in [
        ({"state": {"model": net.state_dict(), "step": 3}, "run": "a"}, "state.model"),
        ({"generator": net.state_dict(), "step": 3}, "generator"),
    ]:
        torch.save(obj, path)
        loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP")
        _assert_same_weights(loaded.model, net)
        assert loaded.weights_key == key and f"took the weights from the entry {key!r}" in loaded.notes


def test_several_sets_of_weights_need_a_weights_key(tmp_path, models):
    net, ema = _mlp(models, seed=1), _mlp(models, seed=2)
    path = tmp_path / "train.pt"
    torch.save({"step": 5, "model": net.state_dict(), "ema": ema.state_dict()}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    _assert_one_line(exc, "several sets of weights ('model', 'ema')", "--weights-key KEY")
    for key, want in [("model", net), ("ema", ema)]:
        loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP", weights_key=key)
        _assert_same_weights(loaded.model, want)
        assert loaded.weights_key == key
    torch.save({"generator": net.state_dict(), "discriminator": ema.state_dict()}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    _assert_one_line(exc, "'generator', 'discriminator'", "--weights-key")


def test_weights_key_errors(tmp_path, models, script_file):
    net = _mlp(models)
    path = tmp_path / "train.pt"
    torch.save({"step": 5, "state": {"model": net.state_dict(), "lr": 0.1}}, path)
    loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP", weights_key="state.model")
    _assert_same_weights(loaded.model, net)
    for key, fragments in [
        ("emaa", ["--weights-key 'emaa' not found", "the checkpoint has no entry 'emaa'", "'step', 'state'"]),
        ("state.ema", ["entry 'state' has no entry 'ema'", "its entries are 'model', 'lr'"]),
        ("step.model", ["entry 'step' is a int, not a dict"]),
        (
            "step",
            ["--weights-key 'step'", "is a int, not a dict of tensors", "holding weights: 'state.model'"],
        ),
    ]:
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(path, model_factory=f"{MODELS}:MLP", weights_key=key)
        _assert_one_line(exc, *fragments)
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP", weights_key="model")
    _assert_one_line(exc, "plain state_dict", "leave out --weights-key")
    loaded = load_checkpoint(script_file, weights_key="model")  # a self-contained model: not used
    assert "weights_key 'model' was not used" in " ".join(loaded.notes)


# --------------------------------------------------------------------------- bad input
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "nope.pt")
    _assert_one_line(exc, "checkpoint not found", "nope.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path)
    _assert_one_line(exc, "is a directory")


def _cut(path: Path, dst: Path) -> Path:
    data = path.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_and_corrupt_files(tmp_path, models, pt2_file, script_file):
    net = _mlp(models)
    good = save_checkpoint(tmp_path / "good.pt", net, model_factory=f"{MODELS}:MLP")
    legacy = tmp_path / "legacy.pt"
    torch.save(net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    st = tmp_path / "good.safetensors"
    safetensors_torch.save_file(net.state_dict(), st)
    cases = {
        "half.pt": (_cut(good, tmp_path / "half.pt"), "torch.save file"),
        "half-legacy.pt": (_cut(legacy, tmp_path / "half-legacy.pt"), "torch.save file"),
        "half.pt2": (_cut(pt2_file, tmp_path / "half.pt2"), "torch.export archive"),
        "half-script.pt": (_cut(script_file, tmp_path / "half-script.pt"), "torch.save file"),
        "half.safetensors": (_cut(st, tmp_path / "half.safetensors"), "safetensors file"),
    }
    rng = torch.Generator().manual_seed(0)
    for suffix in (".pt", ".pth", ".ckpt", ".pt2", ".safetensors"):
        noise = tmp_path / f"noise{suffix}"
        noise.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist()))
        cases[noise.name] = (noise, "truncated or corrupt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases["empty.pt"] = (empty, "torch.save file")
    for name, (path, fragment) in cases.items():
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(path, model_factory=f"{MODELS}:MLP")
        _assert_one_line(exc, "truncated or corrupt", fragment, "re-save or re-copy")
        assert name in str(exc.value)


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, "unknown checkpoint format", "curvkit_checkpoint_loaders")
    other_zip = tmp_path / "stuff.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("a/readme.txt", "hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(other_zip)


def test_weights_that_do_not_fit(tmp_path, models):
    path = tmp_path / "sd.pt"
    torch.save(_mlp(models, hidden=4).state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP", model_kwargs={"hidden": 5})
    _assert_one_line(exc, "3 shape mismatches", "net.0.weight [4, 3] vs model [5, 3]", "--model-kwargs")
    state = _mlp(models).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["net.2.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    _assert_one_line(exc, "1 missing key (net.2.bias)", "1 unexpected key (extra.weight)")
    loose = load_checkpoint(path, model_factory=f"{MODELS}:MLP", strict=False)
    assert loose.missing == ["net.2.bias"] and loose.unexpected == ["extra.weight"]
    # long lists are cut
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(40)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model_factory=f"{MODELS}:MLP")
    _assert_one_line(exc, "40 unexpected keys", "(+35 more)", "4 missing keys")


def test_non_finite_weights(tmp_path, models):
    net = _mlp(models)
    with torch.no_grad():
        net.net[0].weight[0, 0] = float("nan")
        net.net[2].bias[1] = float("inf")
        net.net[2].bias[0] = float("-inf")
    path = save_checkpoint(tmp_path / "nan.pt", net, model_factory=f"{MODELS}:MLP")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, "net.0.weight (1 NaN)", "net.2.bias (2 Inf)", "earlier checkpoint")
    assert load_checkpoint(path, check_finite=False).model.net[2].bias.isinf().all()


def test_no_model_and_no_metadata(tmp_path, models):
    path = tmp_path / "sd.pt"
    torch.save(_mlp(models).state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, "pass --model module:factory")


def test_dicts_without_weights(tmp_path):
    path = tmp_path / "x.pt"
    for obj, fragment in [({"epoch": 3, "note": "x"}, "no model weights found"), ([1, 2], "holds a list")]:
        torch.save(obj, path)
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(path, model_factory="torch.nn:Identity")
        _assert_one_line(exc, fragment)


def test_metadata_from_a_newer_curvkit(tmp_path, models):
    path = tmp_path / "new.pt"
    torch.save({"curvkit": {"version": 2, "model_factory": f"{MODELS}:MLP"}, "model_state_dict": {}}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, "version 2", "upgrade curvkit")


def test_bad_map_location(tmp_path, models):
    path = save_checkpoint(tmp_path / "a.pt", _mlp(models), model_factory=f"{MODELS}:MLP")
    with pytest.raises(CheckpointError, match="not a device"):
        load_checkpoint(path, map_location="gpu please")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            load_checkpoint(path, map_location="cuda")


# --------------------------------------------------------------------------- the loader hook
def _json_loader(name: str = "json-weights", suffix: str = ".jsonw") -> CheckpointLoader:
    def load(path, *, map_location, trust_pickle, **kwargs):
        raw = json.loads(path.read_text())
        state = {
            k: torch.tensor(v, dtype=torch.float32, device=map_location) for k, v in raw["weights"].items()
        }
        return {"curvkit": raw["curvkit"], "model_state_dict": state}

    return CheckpointLoader(
        name=name, detect=lambda p: p.suffix == suffix, load=load, description="JSON weights"
    )


def _plugin(name: str, *loaders: CheckpointLoader) -> types.ModuleType:
    module = types.ModuleType(name)

    @curvkit.hookimpl
    def curvkit_checkpoint_loaders():
        return list(loaders)

    module.curvkit_checkpoint_loaders = curvkit_checkpoint_loaders
    return module


@pytest.fixture
def registry_guard() -> Iterator[None]:
    pm = curvkit.plugin_manager()
    before = sorted(name for name, _ in pm.list_name_plugin())
    yield
    assert sorted(name for name, _ in pm.list_name_plugin()) == before
    assert [loader.name for loader in checkpoint_formats()] == [loader.name for loader in BUILTIN_LOADERS]


def test_builtin_loaders_are_listed():
    assert [loader.name for loader in BUILTIN_LOADERS] == [
        "safetensors",
        "torch.export",
        "torchscript",
        "torch",
    ]
    assert all(loader.description and not loader.plugin for loader in BUILTIN_LOADERS)


def test_a_plugin_adds_a_format(tmp_path, models, registry_guard):
    net = _mlp(models)
    path = tmp_path / "model.jsonw"
    path.write_text(
        json.dumps(
            {
                "curvkit": {"version": 1, "model_factory": f"{MODELS}:MLP", "model_kwargs": {"hidden": 4}},
                "weights": {k: v.tolist() for k, v in net.state_dict().items()},
            }
        )
    )
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(path)
    plugin = _plugin("test-json-loader", _json_loader())
    curvkit.register_plugin(plugin, name="test-json-loader")
    try:
        assert [(x.name, x.plugin) for x in curvkit.registry.checkpoint_loaders()] == [
            ("json-weights", "test-json-loader")
        ]
        assert [x.name for x in checkpoint_formats()][0] == "json-weights"  # plugins first
        info = {p.name: p for p in curvkit.loaded_plugins()}["test-json-loader"]
        assert info.checkpoint_loaders == ("json-weights",) and info.estimators == ()
        loaded = load_checkpoint(path)
        assert loaded.format == "json-weights" and loaded.metadata["model_factory"] == f"{MODELS}:MLP"
        _assert_same_weights(loaded.model, net)
    finally:
        curvkit.unregister_plugin(plugin)


def test_a_plugin_loader_comes_before_the_builtins(tmp_path, models, registry_guard):
    net = _mlp(models)
    path = tmp_path / "special.pt"
    torch.save({"weights_v2": {k: v * 1 for k, v in net.state_dict().items()}}, path)
    seen = []

    def load(p, *, map_location, trust_pickle, **kwargs):
        seen.append(map_location)
        return torch.load(p, map_location=map_location, weights_only=True)["weights_v2"]

    loader = CheckpointLoader("v2", detect=lambda p: p.name == "special.pt", load=load)
    plugin = _plugin("test-v2", loader)
    curvkit.register_plugin(plugin, name="test-v2")
    try:
        loaded = load_checkpoint(path, model_factory=f"{MODELS}:MLP")
        assert loaded.format == "v2" and seen == [torch.device("cpu")]
        _assert_same_weights(loaded.model, net)
    finally:
        curvkit.unregister_plugin(plugin)


def test_plugin_loader_errors(tmp_path, registry_guard):
    for loaders, fragment in [
        ((_json_loader(), _json_loader()), "registered by both plugin"),
        ((_json_loader(name="torch"),), "name of a built-in checkpoint loader"),
        (("not a loader",), "return curvkit.CheckpointLoader"),
    ]:
        with pytest.raises(PluginError, match=fragment):
            curvkit.register_plugin(_plugin("test-bad-loader", *loaders), name="test-bad-loader")
    # a failing detect or load is reported as the plugin's failure, in one line
    path = tmp_path / "x.boom"
    path.write_text("{}")

    def explode(*args, **kwargs):
        raise ValueError("kaboom\nsecond line")

    for loader, error, fragment in [
        (
            CheckpointLoader("boom-detect", detect=explode, load=explode),
            PluginError,
            "failed while inspecting",
        ),
        (
            CheckpointLoader("boom-load", detect=lambda p: p.suffix == ".boom", load=explode),
            CheckpointError,
            "kaboom",
        ),
        (
            CheckpointLoader("boom-type", detect=lambda p: p.suffix == ".boom", load=lambda p, **k: 3),
            PluginError,
            "returned a int",
        ),
    ]:
        plugin = _plugin(f"test-{loader.name}", loader)
        curvkit.register_plugin(plugin, name=f"test-{loader.name}")
        try:
            with pytest.raises(error) as exc:
                load_checkpoint(path, model_factory="torch.nn:Identity")
            _assert_one_line(exc, fragment, loader.name)
        finally:
            curvkit.unregister_plugin(plugin)


def test_pickle_refusal_inside_an_export_archive(tmp_path, pt2_file):
    """Pickled records of a .pt2 are loaded with weights_only=True too."""

    def edit(rel, data):
        if rel.startswith("data/sample_inputs/"):
            buf = io.BytesIO()
            torch.save(nn.Identity(), buf)  # not loadable with weights_only=True
            return buf.getvalue()
        return data

    path = tmp_path / "evil.pt2"
    _rewrite_zip(pt2_file, path, edit)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    _assert_one_line(exc, "arbitrary code", "--trust-pickle")


# --------------------------------------------------------------------------- folders
def test_find_checkpoints_asks_every_loader(tmp_path, models, pt2_file, script_file, registry_guard):
    net = _mlp(models)
    folder = tmp_path / "run"
    folder.mkdir()
    sd = net.state_dict()
    torch.save(sd, folder / "a.pt")
    torch.save({"model": sd}, folder / "b.pth", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": sd}, folder / "c.ckpt")
    torch.save(sd, folder / "d.tar")
    torch.save(sd, folder / "e.weights")  # any suffix: the content says torch.save
    safetensors_torch.save_file(sd, folder / "f.safetensors")
    safetensors_torch.save_file(sd, folder / "g.bin")
    (folder / "h.jit").write_bytes(script_file.read_bytes())
    (folder / "i.pt2").write_bytes(pt2_file.read_bytes())
    (folder / "j.pt").write_bytes(b"")  # damaged: found, and loading it says so
    (folder / "k.jsonw").write_text("{}")  # a plugin's format, below
    not_checkpoints = {
        "notes.txt": b"lr 0.1",
        "results.json": b'{"a": 1}',
        "results.h5": b"\x89HDF\r\n\x1a\n" + bytes(504),
        "README": b"",
    }
    for name, data in not_checkpoints.items():
        (folder / name).write_bytes(data)
    np.savez(folder / "data.npz", x=np.zeros(3))  # a zip, but not a torch archive
    torch.save(sd, folder / ".a.pt.123.tmp")  # a save in progress
    (folder / "sub").mkdir()
    torch.save(sd, folder / "sub" / "deeper.pt")

    found = [p.name for p in find_checkpoints(folder)]
    assert found == [
        "a.pt",
        "b.pth",
        "c.ckpt",
        "d.tar",
        "e.weights",
        "f.safetensors",
        "g.bin",
        "h.jit",
        "i.pt2",
        "j.pt",
    ]
    assert not is_checkpoint(folder / "missing.pt") and not is_checkpoint(folder)
    plugin = _plugin("test-json-loader", _json_loader())
    curvkit.register_plugin(plugin, name="test-json-loader")
    try:
        assert [p.name for p in find_checkpoints(folder)] == [*found, "k.jsonw"]
    finally:
        curvkit.unregister_plugin(plugin)
    with pytest.raises(CheckpointError, match="not a folder"):
        find_checkpoints(folder / "a.pt")
