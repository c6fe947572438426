"""``torch.export`` archives (``.pt2``): device-normalised, put in evaluation mode, input-checked.

``torch.export.load`` has no ``map_location``, so the archive is rewritten in
memory with every device set to the CPU before it is loaded (see
:func:`_cpu_export_archive`).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.checkpoints._text import exc_line
from curvkit.checkpoints._types import CheckpointError, CheckpointLoader, corrupt_file_error
from curvkit.checkpoints.detect import detector
from curvkit.checkpoints.torch_format import is_weights_only_refusal, pickle_refusal
from curvkit.errors import CurvkitError, DataError, one_line

__all__ = ["LOADER"]


def _cpu_devices(obj: Any) -> Any:
    """The JSON of an export archive with every serialised ``Device`` set to the CPU."""
    if isinstance(obj, dict):
        if set(obj) == {"type", "index"} and isinstance(obj["type"], str):
            return {"type": "cpu", "index": None}
        return {k: _cpu_devices(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_devices(v) for v in obj]
    return obj


def _repickle(data: bytes, path: Path, record: str, trust_pickle: bool) -> bytes:
    """A pickled record of an export archive, loaded onto the CPU and saved again."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        if is_weights_only_refusal(exc):
            raise pickle_refusal(path, exc) from exc
        raise corrupt_file_error(path, f"torch.export archive (record {record})", exc) from exc
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _cpu_export_archive(path: Path, trust_pickle: bool) -> io.BytesIO:
    """A copy of a ``.pt2`` archive in which nothing refers to a GPU.

    ``torch.export.load`` has no ``map_location``: it rebuilds each weight on the
    device recorded in the archive's JSON (and ``torch.load``s pickled records
    without a map location). So the JSON records' ``Device`` entries are set to
    the CPU, and pickled records (sample inputs, tensor-subclass weights) are
    loaded onto the CPU with ``weights_only=True`` and saved again. Raw weight
    bytes are device-independent and copied as they are.
    """
    what = "torch.export archive"
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise corrupt_file_error(path, what, exc) from exc
    out = io.BytesIO()
    with zf, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        records = {n: n.split("/", 1)[1] for n in zf.namelist() if "/" in n}
        rel = set(records.values())
        if "archive_format" not in rel:
            raise CheckpointError(
                f"{path} is a torch.export archive from torch 2.7 or older (no archive_format record); "
                "re-export it with this torch's torch.export.save"
            )
        if not any(r.startswith("models/") and r.endswith(".json") for r in rel):
            if any(r.startswith("data/aotinductor/") for r in rel):
                raise CheckpointError(
                    f"{path} holds only AOTInductor-compiled code, which cannot be differentiated; "
                    "save the ExportedProgram with torch.export.save instead"
                )
            raise corrupt_file_error(path, what, ValueError("no models/*.json record"))
        pickled: set[str] = set()
        for name, r in records.items():
            if re.fullmatch(r"data/(weights|constants)/[^/]+_config\.json", r):
                try:
                    config = json.loads(zf.read(name)).get("config", {})
                except (ValueError, zipfile.BadZipFile, OSError) as exc:
                    raise corrupt_file_error(path, what, exc) from exc
                folder = r.rsplit("/", 1)[0]
                pickled |= {f"{folder}/{m['path_name']}" for m in config.values() if m.get("use_pickle")}
        try:
            for info in zf.infolist():
                r = records.get(info.filename, info.filename)
                data = zf.read(info)
                if r.endswith(".json"):
                    data = json.dumps(_cpu_devices(json.loads(data))).encode()
                elif r.startswith("data/constants/opaque_obj"):
                    if not trust_pickle:
                        raise pickle_refusal(path, ValueError(f"record {r} is a Python pickle"))
                elif r.startswith("data/constants/custom_obj"):
                    pass  # a TorchScript-pickled torchbind object
                elif (
                    r in pickled
                    or r.startswith("data/sample_inputs/")
                    or re.fullmatch(r"data/\w+/\w+\.pt", r)
                ):
                    data = _repickle(data, path, r, trust_pickle)
                zo.writestr(info.filename, data)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise corrupt_file_error(path, what, exc) from exc
    out.seek(0)
    return out


class _ExportInputCheck(nn.Module):
    """Runs before an exported program's own guards: turns a wrong input shape into a clear error.

    torch.export fixes every dimension not declared dynamic; its guards then fail
    with ``AssertionError: Guard failed: x.size()[0] == 4``, which says nothing
    about the fix. This replaces the program's ``_guards_fn`` submodule (which
    receives the flattened user inputs) and raises a :class:`DataError` instead.
    """

    def __init__(self, guards: nn.Module, shapes: list[tuple[int | None, ...] | None]):
        super().__init__()
        self.guards = guards
        self.shapes = shapes

    @staticmethod
    def _show(shape: tuple[int | None, ...]) -> str:
        return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"

    def forward(self, *inputs: Any) -> Any:
        """Check the inputs' static dimensions, then run the program's guards."""
        for x, want in zip(inputs, self.shapes):
            if want is None or not isinstance(x, Tensor):
                continue
            got = tuple(x.shape)
            if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
                hint = ""
                if len(got) == len(want) and want and want[0] is not None and got[1:] == want[1:]:
                    hint = (
                        f"; re-export with dynamic_shapes marking the batch dimension "
                        f"(torch.export.Dim('batch')), or use batch size {want[0]} and a sample count "
                        f"divisible by it"
                    )
                raise DataError(
                    f"the torch.export program takes inputs of shape {self._show(want)} "
                    f"(* = dynamic), got {got}{hint}"
                )
        try:
            return self.guards(*inputs)
        except AssertionError as exc:
            raise DataError(f"the inputs do not fit the torch.export program ({one_line(exc, 150)})") from exc


def _export_to_eval(gm: torch.fx.GraphModule) -> list[str]:
    """Rewrite an exported graph into evaluation mode; return notes.

    ``torch.export`` bakes the module's training mode into the graph
    (``aten.batch_norm(..., training=True)``, ``aten.dropout(..., train=True)``,
    an in-place increment of ``num_batches_tracked``), and ``ExportedProgram
    .module()`` refuses ``train()`` and ``eval()``. Every ``train``/``training``
    flag of an aten op is set to False, the increments are dropped, and the
    module's ordinary ``train``/``eval`` are restored (they then only set flags).
    """
    notes: list[str] = []
    flipped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        for i, arg in enumerate(schema.arguments):
            if arg.name not in ("train", "training") or str(arg.type) != "bool":
                continue
            if i < len(node.args) and node.args[i] is True:
                node.args = (*node.args[:i], False, *node.args[i + 1 :])
                flipped += 1
            elif node.kwargs.get(arg.name) is True:
                node.kwargs = {**node.kwargs, arg.name: False}
                flipped += 1
        if schema.is_mutable and node.args and getattr(node.args[0], "op", None) == "get_attr":
            target = str(node.args[0].target)
            if target.endswith("num_batches_tracked") and not node.users:
                gm.graph.erase_node(node)
            else:
                notes.append(f"the exported program changes its buffer {target} in forward ({node.target})")
    if flipped:
        notes.append(f"the program was exported in training mode: set {flipped} train flags to evaluation")
        gm.graph.lint()
        gm.recompile()
    for name in ("train", "eval"):  # ExportedProgram.module() replaces them with methods that raise
        gm.__dict__.pop(name, None)
    return notes


def _guard_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Install :class:`_ExportInputCheck`; return a note if some input dims are static."""
    guards = getattr(gm, "_guards_fn", None)
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None)
    if not isinstance(guards, nn.Module) or node is None:
        return []
    shapes: list[tuple[int | None, ...] | None] = []
    for arg in node.args:
        val = getattr(arg, "meta", {}).get("val")
        shape = getattr(val, "shape", None) if isinstance(val, Tensor) else None
        shapes.append(None if shape is None else tuple(d if isinstance(d, int) else None for d in shape))
    gm._guards_fn = _ExportInputCheck(guards, shapes)
    static = [s for s in shapes if s and s[0] is not None]
    if static:
        shown = ", ".join(_ExportInputCheck._show(s) for s in static)
        return [f"exported with a static batch dimension: inputs must have shape {shown} exactly"]
    return []


def load_export(path: Path, *, map_location: torch.device, trust_pickle: bool, **_: Any) -> nn.Module:
    """The exported program of a ``.pt2`` archive as a module on ``map_location``, in evaluation mode."""
    buffer = _cpu_export_archive(path, trust_pickle)
    try:
        program = torch.export.load(buffer)
    except CurvkitError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the torch.export program in {path} ({exc_line(exc)}); it may come from "
            f"another torch version (this is {torch.__version__}): re-export it"
        ) from exc
    if map_location.type != "cpu":
        program = torch.export.passes.move_to_device_pass(program, map_location)
    gm = program.module()
    notes = _export_to_eval(gm) + _guard_inputs(gm)
    gm.__dict__["_curvkit_notes"] = notes
    return gm


LOADER = CheckpointLoader(
    name="torch.export",
    detect=detector("torch.export"),
    load=load_export,
    description="torch.export archives (.pt2), loaded on any device",
)
"""The built-in loader of ``torch.export`` archives."""
