"""TorchScript archives (``torch.jit.save``), run through :class:`ScriptModuleAdapter`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvkit.checkpoints._types import CheckpointLoader, corrupt_file_error
from curvkit.checkpoints.detect import detector

__all__ = ["LOADER", "ScriptModuleAdapter"]


class ScriptModuleAdapter(nn.Module):
    """A TorchScript module as an ordinary module that ``torch.func`` can run.

    :func:`torch.func.functional_call` refuses ScriptModules ("The stateless API
    can't be used with Jitted modules"). Moreover, in torch 2.13 ``torch.func``
    transforms through TorchScript's optimising executor are silently wrong:
    once the executor has run a scripted function with gradients a few times,
    ``jvp(grad(f))`` through it is off by O(1), and stays wrong even with
    optimisation switched off afterwards (the optimised plan is cached).

    This adapter holds the scripted module's parameters and buffers, under the
    same names (tied weights stay tied), in a mirror of its module tree. Each
    call writes the adapter's current tensors (which ``functional_call`` may
    have replaced) into the scripted module, runs it with optimisation off
    (``torch.jit.optimized_execution(False)``, which is thread-local) and puts
    the previous tensors back. Gradients flow to the adapter's tensors; reverse
    and forward-over-reverse Hessian-vector products match the eager model.
    Run the scripted module only through the adapter: calling
    :attr:`scripted` directly with gradients builds the optimised plan above.

    The training flags of the mirror are copied to the scripted module before
    each call, so ``eval()`` and ``train()`` work for scripted modules; a traced
    module keeps the mode it was traced in.
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        object.__setattr__(self, "_scripted", scripted)  # not a submodule: its tensors live here
        for name, _ in scripted.named_modules():
            if name:
                self._mirror(name, create=True)
        param_names = {n for n, _ in scripted.named_parameters(remove_duplicate=False)}
        tied: dict[int, nn.Parameter] = {}
        slots = []
        entries = [*scripted.named_parameters(remove_duplicate=False), *scripted.named_buffers()]
        for name, tensor in entries:
            owner_name, _, leaf = name.rpartition(".")
            owner = self._mirror(owner_name, create=True)
            if name in param_names:
                if id(tensor) not in tied:
                    tied[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
                owner.register_parameter(leaf, tied[id(tensor)])
            else:
                owner.register_buffer(leaf, tensor.detach())
            slots.append(name)
        self._slots = tuple(slots)
        self._module_names = tuple(n for n, _ in scripted.named_modules())
        for name in self._module_names:
            self._mirror(name).training = self._script_module(name).training

    @property
    def scripted(self) -> torch.jit.ScriptModule:
        """The TorchScript module."""
        return self._scripted

    def _mirror(self, name: str, create: bool = False) -> nn.Module:
        module: nn.Module = self
        for part in name.split(".") if name else ():
            if part not in module._modules:
                if not create:
                    raise KeyError(name)
                module.add_module(part, nn.Module())
            module = module._modules[part]  # type: ignore[assignment]
        return module

    def _script_module(self, name: str) -> Any:
        module = self._scripted
        for part in name.split(".") if name else ():
            module = getattr(module, part)
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the scripted module with this adapter's parameters and buffers."""
        current = dict(self.named_parameters(remove_duplicate=False))
        current.update(self.named_buffers(remove_duplicate=False))
        saved = []
        with torch.jit.optimized_execution(False):
            try:
                for name in self._module_names:
                    mode = self._mirror(name).training
                    target = self._script_module(name)
                    if target.training != mode:
                        target.training = mode
                for name in self._slots:
                    owner_name, _, leaf = name.rpartition(".")
                    owner = self._script_module(owner_name)
                    saved.append((owner, leaf, getattr(owner, leaf)))
                    owner._c.setattr(leaf, current[name])
                return self._scripted(*args, **kwargs)
            finally:
                for owner, leaf, old in reversed(saved):
                    owner._c.setattr(leaf, old)


def load_torchscript(path: Path, *, map_location: torch.device, **_: Any) -> nn.Module:
    """``torch.jit.load`` onto ``map_location``, wrapped in a :class:`ScriptModuleAdapter`."""
    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is what it is
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:
        raise corrupt_file_error(path, "TorchScript archive", exc) from exc
    return ScriptModuleAdapter(scripted)


LOADER = CheckpointLoader(
    name="torchscript",
    detect=detector("torchscript"),
    load=load_torchscript,
    description="TorchScript archives (torch.jit.save)",
)
"""The built-in loader of TorchScript archives."""
